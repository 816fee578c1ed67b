"""One run per seed: forked from the launcher, as submitit local jobs, or as SLURM jobs.

Forked runs start with torch and the configuration already imported; seeds that start together
keep level (:mod:`tract_repro.launching.pacing`), because the kernel shares too few cores unevenly.
A launcher stopped by Ctrl-C or SIGTERM stops the runs it started; they resume from their checkpoints.
"""
import multiprocessing
import os
import re
import signal
import sys
import threading
import time
import traceback
from pathlib import Path

from tract_repro import config
from tract_repro.common.errors import ConfigError, JobFailed, one_line
from tract_repro.launching import slurm
from tract_repro.launching.jobs import check_options, check_workdir, run_job
from tract_repro.launching.local import failure_line, local_executor, wait
from tract_repro.launching.pacing import Pace
from tract_repro.training.preemption import Stopped

FORK_LOG = "launch.log"  # a forked run's stdout and stderr, in its run directory


def seed_runs(files, bindings, workdir, seeds):
    """[(run directory, config text)] of the seeds' runs not yet complete (``{seed}`` in workdir and bindings)."""
    seeds = check_seeds(seeds)
    if "{seed}" not in str(workdir):
        raise ConfigError("--seeds needs a --workdir containing {seed}, e.g. runs/x/s{seed}")
    runs = []
    for seed in seeds:
        text = config.parse(files, [b.replace("{seed}", str(seed)) for b in bindings] + [f"train.seed = {seed}"])
        check_options()  # every seed's options, before any run directory is made
        run_dir = Path(str(workdir).format(seed=seed))
        if check_workdir(run_dir, text) != "complete":
            runs.append((run_dir, text))
    return runs


def check_seeds(seeds):
    """The seeds of ``--seeds`` as ints, checked before anything is written: whole numbers at least 0 (as
    ``train.seed`` takes), each once; ConfigError in one line otherwise."""
    values = []
    for seed in seeds:
        text = str(seed).strip()
        if not re.fullmatch(r"[0-9]+", text):
            raise ConfigError(f"--seeds {seed}: give whole numbers, at least 0, as train.seed takes (e.g. --seeds 0 1 2)")
        if int(text) in values:
            raise ConfigError(f"--seeds {' '.join(map(str, seeds))}: seed {int(text)} is given twice: give each seed once")
        values.append(int(text))
    return values


def run_seeds(runs, executor="inline", parallel=1, pace=True):
    """Train ``runs`` at most ``parallel`` at a time (inline: forked; local: submitit jobs); fail if any fails."""
    start = fork if executor == "inline" else submit_local
    progress = None  # forked seeds that all start together keep level
    if executor == "inline" and pace and 1 < len(runs) <= max(1, parallel):
        progress = multiprocessing.get_context("fork").RawArray("q", len(runs))  # steps taken, all 0
    slots = {str(run_dir): i for i, (run_dir, _) in enumerate(runs)}
    queue, running, failed = list(runs), [], []
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143)) if main_thread else None  # a kill reaches the except below
    try:
        while queue or running:
            while queue and len(running) < max(1, parallel):
                run_dir, text = queue.pop(0)
                running.append((run_dir, start(text, run_dir) if progress is None
                                else fork(text, run_dir, pace=(progress, slots[str(run_dir)]))))
            time.sleep(0.2)
            for item in list(running):
                result = item[1]()
                if result is None:
                    continue
                running.remove(item)
                if progress is not None:
                    progress[slots[str(item[0])]] = -1  # finished or failed: no sibling waits for it
                if result == "":
                    print(f"done: {item[0]}", flush=True)
                else:
                    failed.append(f"{item[0]}: {result}")
    except BaseException:  # Ctrl-C or a kill of the launcher: stop the runs it started (they resume from checkpoints)
        for _, poll in running:
            poll.stop()
        raise
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
    if failed:
        raise JobFailed(f"{len(failed)} of {len(runs)} runs failed; first: {failed[0]}")


def fork(text, run_dir, pace=None):
    """Start ``run_job`` in a process forked from this one; return a poll: None while running, then
    "" on success or the job's exception line.  ``pace``: (shared progress array, this run's slot).

    The parent has run no torch operation (so no OpenMP pool exists to break in the child); it imports
    what every run needs first, once, instead of once per run.
    """
    import torch._dynamo  # noqa: F401  (torch.optim imports it on first use: ~2 s per fresh process)

    Path(run_dir).mkdir(parents=True, exist_ok=True)
    process = multiprocessing.get_context("fork").Process(target=_forked_job, args=(text, str(run_dir), pace, os.getpid()),
                                                          name=f"tract {run_dir}")
    process.start()
    log = Path(run_dir) / FORK_LOG

    def poll():
        if process.exitcode is None:
            return None
        return "" if process.exitcode == 0 else failure_line(log.read_text() if log.is_file() else f"exit {process.exitcode}")
    poll.stop = process.terminate
    return poll


def _forked_job(text, run_dir, pace=None, parent=None):
    """The forked child: stdout and stderr (C level too) go to ``<run_dir>/launch.log``; exit 1 on failure.

    It dies with the launcher: SIGTERM when the launcher's process ends, however it ends, so that it
    checkpoints at its next step boundary and stops.
    """
    _die_with_parent(parent)
    code = 1
    try:
        log = open(Path(run_dir) / FORK_LOG, "a", buffering=1)
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        sys.stdout = sys.stderr = log
        run_job(text, run_dir, pace=None if pace is None else Pace(*pace))
        code = 0
    except Stopped as exc:  # Ctrl-C or SIGTERM: a checkpoint was written
        print(f"{type(exc).__name__}: {one_line(exc)}", flush=True)
        code = exc.exit_status
    except BaseException:  # noqa: BLE001  (reported through the log's last exception line)
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        os._exit(code)


def _die_with_parent(parent):
    """Ask Linux to send this process SIGTERM when its parent ends (prctl PR_SET_PDEATHSIG)."""
    if parent is None or not sys.platform.startswith("linux"):
        return
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG = 1
    if os.getppid() != parent:  # the launcher ended before the request was made
        os.kill(os.getpid(), signal.SIGTERM)


def submit_local(text, run_dir):
    """Start ``run_job`` as a submitit local job; return a poll like :func:`fork`'s."""
    job = local_executor(Path(run_dir) / "submitit").submit(run_job, text, str(run_dir))

    def poll():
        if not job.done():
            return None
        try:
            wait(job)
            return ""
        except JobFailed as exc:
            return str(exc)
    poll.stop = job.cancel
    return poll


def submit(runs, executor, parallel=1, pace=True, wait_for_slurm=False):
    """Run or submit ``runs`` ([(run directory, config text)]) on ``executor``."""
    if executor == "slurm":
        slurm.submit_runs(runs, wait_for_slurm)
    else:
        run_seeds(runs, executor, parallel, pace)
