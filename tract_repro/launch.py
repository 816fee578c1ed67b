"""Launch a run from gin files: ``python -m tract_repro.launch FILE.gin [...] [--gin 'a = b'] [--workdir DIR] [--executor inline|local|slurm [--wait]]``.

The job re-parses the config text in its own process, so inline and submitit runs take the
same path.  ``--seeds 0 1 2 --parallel 2`` runs one job per seed (``{seed}`` in the workdir
and in bindings is replaced) as submitit local jobs, two at a time.  Errors in the configuration print
one line and exit with status 2.

``--executor slurm`` submits the run (or each seed's run) as a SLURM job with the options bound to
``slurm.*`` in gin (:mod:`tract_repro.slurm`) and returns.  With ``--wait`` it blocks until the job
has finished, requeues included, and exits 1 with one line if the job failed.
"""
import argparse
import os
import re
import sys
import time
from pathlib import Path

import gin

from tract_repro import config


def run_job(config_text, workdir):
    """The job body: parse the config text, write it beside the run, and train."""
    from tract_repro.training.loop import train

    config.parse(text=config_text)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.gin").write_text(config_text)
    return str(train(workdir))


def check_workdir(workdir, config_text):
    """Refuse to reuse a run directory that holds a run of a different configuration."""
    saved = Path(workdir) / "config.gin"
    if saved.is_file() and saved.read_text() != config_text:
        raise config.ConfigError(f"{workdir} holds a run with a different configuration: pass a new --workdir "
                                 f"(or delete {workdir} to start over)")
    if (Path(workdir) / "ema.pt").is_file() and saved.is_file():
        return "complete"
    return None


@gin.configurable
def local_executor(folder, timeout_min=24 * 60, cpus_per_task=None, gpus_per_node=None):
    """submitit's local executor: the job runs in a fresh process.

    submitit hides every GPU from a local job unless it asks for some, so by default each job
    sees all of this machine's GPUs (local jobs share them); ``gpus_per_node = 0`` hides them.
    """
    import submitit
    import torch

    executor = submitit.LocalExecutor(folder=folder)
    gpus = torch.cuda.device_count() if gpus_per_node is None else int(gpus_per_node)
    params = dict(timeout_min=timeout_min, gpus_per_node=gpus)
    if cpus_per_task:
        params["cpus_per_task"] = cpus_per_task
    executor.update_parameters(**params)
    return executor


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
    parser.add_argument("--parallel", type=int, default=1, help="with --seeds: how many local jobs run at once")
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
    """One local submitit job per seed, at most ``--parallel`` at a time; fail if any fails."""
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
    running, failed = [], []
    while jobs or running:
        while jobs and len(running) < max(1, args.parallel):
            run_dir, text = jobs.pop(0)
            running.append((run_dir, local_executor(run_dir / "submitit").submit(run_job, text, str(run_dir))))
        time.sleep(0.5)
        for item in [r for r in running if r[1].done()]:
            running.remove(item)
            try:
                _wait(item[1])
                print(f"done: {item[0]}", flush=True)
            except RuntimeError as exc:
                failed.append(f"{item[0]}: {exc}")
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(args.seeds)} runs failed; first: {failed[0]}")
    return 0


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
        return job.result()
    except submitit.core.utils.FailedJobError as exc:  # report the job's own exception line, not the log paths
        raise RuntimeError(f"job {job.job_id} failed: {failure_line(exc)}") from None


if __name__ == "__main__":
    sys.exit(main())
