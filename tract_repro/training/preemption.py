"""Stopping training at a step boundary when asked to (SLURM's pre-timeout signal, preemption).

The training loop calls :func:`at_step_boundary` after every complete optimisation step, once
that step's periodic checkpoint (if any) is written. Normally it returns at once. After
:func:`request_stop` it writes a checkpoint of the state after that step (unless the periodic
one for this step already exists) and raises :class:`Stopped`, which unwinds ``train()``.
A checkpoint written here is the same as a periodic one: the run resumes from it exactly.

The request comes from another thread: :class:`tract_repro.slurm.SlurmRun` trains in a worker
thread and its submitit ``checkpoint()`` runs in the main thread (see that module).
"""
import threading

_requested = threading.Event()


class Stopped(Exception):
    """Training stopped on request after writing a checkpoint at ``samples``."""

    def __init__(self, samples, path):
        super().__init__(f"training stopped on request at sample {samples}; checkpoint {path}")
        self.samples, self.path = samples, path


def request_stop():
    """Ask the training loop to checkpoint and stop at its next step boundary."""
    _requested.set()


def requested():
    return _requested.is_set()


def reset():
    _requested.clear()


def at_step_boundary(save, path, samples, requested=None):
    """Called by the loop between steps: if a stop was requested, make sure ``path`` holds a
    checkpoint of this step (``save()`` writes it) and raise :class:`Stopped`.

    ``requested`` overrides this process's own flag (data-parallel ranks agree on it first).
    """
    if not (_requested.is_set() if requested is None else requested):
        return
    if not path.is_file():
        save()
    print(f"stop requested: checkpoint at sample {samples} written to {path}", flush=True)
    raise Stopped(samples, path)
