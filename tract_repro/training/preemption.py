"""Stopping training at a step boundary when asked to (SLURM's pre-timeout signal, preemption).

The training loop calls :func:`at_step_boundary` after every complete optimisation step, once
that step's periodic checkpoint (if any) is written. Normally it returns at once. After
:func:`request_stop` it writes a checkpoint of the state after that step (unless the periodic
one for this step already exists) and raises :class:`Stopped`, which unwinds ``train()``.
A checkpoint written here is the same as a periodic one: the run resumes from it exactly.

The request comes from another thread: :class:`tract_repro.slurm.SlurmRun` trains in a worker
thread and its submitit ``checkpoint()`` runs in the main thread (see that module).
"""
import contextlib
import signal
import threading

from tract_repro.common.errors import JobFailed

_requested = threading.Event()
_signal = None


class Stopped(JobFailed):
    """Training stopped on request after writing a checkpoint at ``samples``; the same command resumes it.

    Its exit status is the shell's for the signal that asked for the stop (130 for Ctrl-C, 143 for SIGTERM).
    """

    def __init__(self, samples, path, number=None):
        super().__init__(f"stopped at sample {samples} with a checkpoint ({path}): run the same command again to resume")
        self.samples, self.path, self.signal_number = samples, path, number

    @property
    def exit_status(self):  # read through gin's exception proxy too, which forwards only what the class lacks
        number = getattr(self, "signal_number", None)
        return 1 if number is None else 128 + int(number)


def request_stop():
    """Ask the training loop to checkpoint and stop at its next step boundary."""
    _requested.set()


def requested():
    return _requested.is_set()


def reset():
    global _signal
    _requested.clear()
    _signal = None


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
    raise Stopped(samples, path, _signal)


@contextlib.contextmanager
def stop_on_signals(signals=(signal.SIGINT, signal.SIGTERM)):
    """While training in the main thread: Ctrl-C (SIGINT) or SIGTERM asks for a stop at the next step
    boundary (a checkpoint, then :class:`Stopped`) instead of killing the step.  A second signal of the
    same kind acts at once, as without this.  Elsewhere (a worker thread, e.g. under SLURM, whose
    signals submitit handles) it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    reset()  # a request left by an earlier run of this process is not this run's
    previous = {}

    def handler(number, frame):
        global _signal
        _signal = number
        signal.signal(number, previous[number])  # the next one acts at once
        request_stop()

    for number in signals:
        previous[number] = signal.signal(number, handler)
    try:
        yield
    finally:
        for number, old in previous.items():
            signal.signal(number, old)
