"""Launch a run from gin files: ``python -m tract_repro.launch FILE.gin [...] [--gin 'a = b'] [--workdir DIR] [--executor inline|local|slurm [--wait]]``.

The job re-parses the config text in its own process, so inline and submitit runs take the
same path.  ``--seeds 0 1 2 --parallel 2`` runs one job per seed (``{seed}`` in the workdir
and in bindings is replaced), two at a time, each in a process forked from the launcher (or, with
``--executor local``, as submitit local jobs).  Errors in the configuration print
one line and exit with status 2.

``--executor slurm`` submits the run (or each seed's run) as a SLURM job with the options bound to
``slurm.*`` in gin (:mod:`tract_repro.slurm`) and returns.  With ``--wait`` it blocks until the job
has finished, requeues included, and exits 1 with one line if the job failed.
"""
from tract_repro import warm

warm.forward(__name__, __spec__)  # under `python -m tract_repro.warm`: run in its warm server, not here

import argparse
import os
import re
import signal
import sys
import threading
import time
from pathlib import Path

from tract_repro import config
from tract_repro.local import local_executor


def run_job(config_text, workdir, pace=None):
    """The job body: parse the config text, write it beside the run, and train.

    ``pace``: a :class:`~tract_repro.training.pacing.Pace`, given to forked seeds by :func:`_many`.
    """
    from tract_repro.slurm import export_distributed_environment
    from tract_repro.training.loop import train

    export_distributed_environment()  # in a multi-task submitit job: RANK, WORLD_SIZE, … for torch's env://
    config.parse(text=config_text)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.gin").write_text(config_text)
    return str(train(workdir, pace=pace))


def check_workdir(workdir, config_text):
    """Refuse to reuse a run directory that holds a run of a different configuration."""
    saved = Path(workdir) / "config.gin"
    if saved.is_file() and saved.read_text() != config_text:
        raise config.ConfigError(f"{workdir} holds a run with a different configuration: pass a new --workdir "
                                 f"(or delete {workdir} to start over)")
    if (Path(workdir) / "ema.pt").is_file() and saved.is_file():
        return "complete"
    return None


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m tract_repro.launch", description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", metavar="FILE.gin", help="gin files, parsed in order")
    parser.add_argument("--gin", action="append", default=[], metavar="'name = value'", help="extra binding (repeatable)")
    parser.add_argument("--workdir", help="run directory (default: runs/<last gin file's name>)")
    parser.add_argument("--executor", choices=["inline", "local", "slurm"], default="inline",
                        help="inline: in this process; local: through submitit's local executor; slurm: a SLURM job "
                             "(options from gin: slurm.partition, slurm.gpus_per_node, slurm.time_min, ...)")
    parser.add_argument("--wait", action="store_true",
                        help="with --executor slurm: block until the job (through requeues) finishes; exit 1 if it failed")
    parser.add_argument("--seeds", type=int, nargs="+", help="one run per seed (binds train.seed); --workdir must contain {seed}")
    parser.add_argument("--parallel", type=int, default=1,
                        help="with --seeds: how many runs at once (inline: forked processes; local: submitit jobs)")
    parser.add_argument("--no-pace", action="store_true",
                        help="with --seeds inline: let the forked runs drift apart (by default a run ahead of the others waits)")
    args = parser.parse_args(argv)
    workdir = Path(args.workdir or Path("runs") / Path(args.files[-1]).stem)
    try:
        if args.seeds:
            return _many(args, workdir)
        text = config.parse(args.files, args.gin)
        if check_workdir(workdir, text) == "complete":
            print(f"{workdir} is already complete (ema.pt present); nothing to do")
            return 0
        if config.query("train.teacher") is not None:  # fail fast, before anything is submitted
            from tract_repro.training.teacher import resolve

            resolve(config.query("train.teacher"))
        if args.executor == "slurm":
            _slurm(args, [(workdir, text)])
            return 0
        if args.executor == "inline":
            result = run_job(text, workdir)
        else:
            job = local_executor(workdir / "submitit").submit(run_job, text, str(workdir))
            print(f"submitted job {job.job_id}; logs in {workdir / 'submitit'}", flush=True)
            result = _wait(job)
    except ValueError as exc:  # configuration and input errors: one line, non-zero exit
        if os.environ.get("TRACT_TRACEBACK"):
            raise
        print(f"error: {str(exc).strip().splitlines()[0]}", file=sys.stderr)
        return 2
    except RuntimeError as exc:  # a failed job or a diverged loss: one line, non-zero exit
        if os.environ.get("TRACT_TRACEBACK"):
            raise
        print(f"error: {str(exc).strip().splitlines()[0]}", file=sys.stderr)
        return 1
    print(f"done: {result}")
    return 0


def _many(args, workdir):
    """One run per seed, at most ``--parallel`` at a time; fail if any fails.

    Inline (the default) each run is a process forked from this one, so it starts with torch and the
    configuration already imported; ``--executor local`` makes each a submitit local job (a fresh
    interpreter, logs under ``<run>/submitit``); ``--executor slurm`` submits them.
    """
    if "{seed}" not in str(workdir):
        raise config.ConfigError("--seeds needs a --workdir containing {seed}, e.g. runs/x/s{seed}")
    jobs = []
    for seed in args.seeds:
        text = config.parse(args.files, [b.replace("{seed}", str(seed)) for b in args.gin] + [f"train.seed = {seed}"])
        run_dir = Path(str(workdir).format(seed=seed))
        if check_workdir(run_dir, text) != "complete":
            jobs.append((run_dir, text))
    if args.executor == "slurm":
        _slurm(args, jobs)
        return 0
    start = _fork if args.executor == "inline" else _submit_local
    # Forked seeds that all start together keep level (training.pacing): the kernel shares the cores
    # unevenly, and a seed left alone at the end runs on one core while the other idles.
    progress = None
    if args.executor == "inline" and not args.no_pace and 1 < len(jobs) <= max(1, args.parallel):
        import multiprocessing

        progress = multiprocessing.get_context("fork").RawArray("q", len(jobs))  # steps taken, all 0
    slots = {str(run_dir): i for i, (run_dir, _) in enumerate(jobs)}
    running, failed = [], []
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143)) if main_thread else None  # a kill reaches the except below
    try:
        while jobs or running:
            while jobs and len(running) < max(1, args.parallel):
                run_dir, text = jobs.pop(0)
                running.append((run_dir, start(text, run_dir) if progress is None
                                else _fork(text, run_dir, pace=(progress, slots[str(run_dir)]))))
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
        raise RuntimeError(f"{len(failed)} of {len(args.seeds)} runs failed; first: {failed[0]}")
    return 0


FORK_LOG = "launch.log"  # a forked run's stdout and stderr, in its run directory


def _fork(text, run_dir, pace=None):
    """Start ``run_job`` in a process forked from this one; return a poll: None while running, then
    "" on success or the job's exception line.  ``pace``: (shared progress array, this run's slot).

    The parent has run no torch operation (so no OpenMP pool exists to break in the child); it imports
    what every run needs first, once, instead of once per run.
    """
    import multiprocessing

    import torch._dynamo  # noqa: F401  (torch.optim imports it on first use: ~2 s per fresh process)

    Path(run_dir).mkdir(parents=True, exist_ok=True)
    process = multiprocessing.get_context("fork").Process(target=_forked_job, args=(text, str(run_dir), pace),
                                                          name=f"tract {run_dir}")
    process.start()
    log = Path(run_dir) / FORK_LOG

    def poll():
        if process.exitcode is None:
            return None
        return "" if process.exitcode == 0 else failure_line(log.read_text() if log.is_file() else f"exit {process.exitcode}")
    poll.stop = process.terminate
    return poll


def _forked_job(text, run_dir, pace=None):
    """The forked child: stdout and stderr (C level too) go to ``<run_dir>/launch.log``; exit 1 on failure."""
    from tract_repro.training.pacing import Pace

    import traceback

    code = 1
    try:
        log = open(Path(run_dir) / FORK_LOG, "a", buffering=1)
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        sys.stdout = sys.stderr = log
        run_job(text, run_dir, pace=None if pace is None else Pace(*pace))
        code = 0
    except BaseException:  # noqa: BLE001  (reported through the log's last exception line)
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        os._exit(code)


def _submit_local(text, run_dir):
    """Start ``run_job`` as a submitit local job; return a poll like :func:`_fork`'s."""
    job = local_executor(Path(run_dir) / "submitit").submit(run_job, text, str(run_dir))

    def poll():
        if not job.done():
            return None
        try:
            _wait(job)
            return ""
        except RuntimeError as exc:
            return str(exc)
    poll.stop = job.cancel
    return poll


def _slurm(args, runs):
    """Submit each (workdir, config text) as a SLURM job; with --wait, wait for them all, then fail if any failed.

    A run that SLURM is already queueing or running is not submitted again: its job is waited for.
    """
    from tract_repro import slurm

    jobs = []
    for run_dir, text in runs:
        config.parse(text=text)
        options = slurm.slurm()  # the gin-bound slurm.* options, checked
        slurm.check_available()
        job = slurm.live_job(run_dir)
        if job is not None:
            print(f"{run_dir} is already queued or running as SLURM job {job.job_id}: not submitted again", flush=True)
        else:
            job = slurm.submit(text, run_dir, options)
            print(f"submitted SLURM job {job.job_id}; logs in {run_dir / slurm.LOGS / job.job_id}", flush=True)
        jobs.append(job)
    if not args.wait:
        return
    failed = []
    try:
        for job in jobs:
            try:
                print(f"done: {slurm.wait(job)}", flush=True)
            except RuntimeError as exc:
                failed.append(str(exc))
    except KeyboardInterrupt:
        ids = " ".join(j.job_id for j in jobs)
        raise RuntimeError(f"interrupted; the SLURM jobs keep running (scancel {ids} stops them)") from None
    if failed:
        raise RuntimeError(failed[0] if len(jobs) == 1 else f"{len(failed)} of {len(jobs)} jobs failed; first: {failed[0]}")


def failure_line(exc):
    """The job's own exception line from a submitit error, not the log paths around it."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    errors = [line for line in lines if re.match(r"^[A-Za-z_][\w.]*(Error|Exception|Diverged)\b.*:", line)]
    return (errors or lines or [str(exc)])[-1]


def _wait(job):
    import submitit

    try:
        return job.results()[0]  # a job of several tasks (data-parallel) has one result per task
    except submitit.core.utils.FailedJobError as exc:  # report the job's own exception line, not the log paths
        raise RuntimeError(f"job {job.job_id} failed: {failure_line(exc)}") from None


if __name__ == "__main__":
    from tract_repro.process import exit_now

    exit_now(main())
