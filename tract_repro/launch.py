"""Launch a run from gin files: ``python -m tract_repro.launch FILE.gin [...] [--gin 'a = b'] [--workdir DIR] [--executor inline|local|slurm [--wait]]``.

The job re-parses the config text in its own process, so inline and submitit runs take the
same path (:mod:`tract_repro.launching.jobs`).  ``--seeds 0 1 2 --parallel 2`` runs one job per
seed (``{seed}`` in the workdir and in bindings is replaced), two at a time, each in a process
forked from the launcher (or, with ``--executor local``, as submitit local jobs;
:mod:`tract_repro.launching.seeds`).  Errors in the configuration print one line and exit with status 2.

``--executor slurm`` submits the run (or each seed's run) as a SLURM job with the options bound to
``slurm.*`` in gin (:mod:`tract_repro.launching.slurm`) and returns.  With ``--wait`` it blocks until
the job has finished, requeues included, and exits 1 with one line if the job failed.
"""
from tract_repro.launching import warm

warm.forward(__name__, __spec__)  # under `python -m tract_repro.warm`: run in its warm server, not here

import argparse
from pathlib import Path

from tract_repro import config
from tract_repro.common.cli import command
from tract_repro.launching import jobs, seeds, slurm
from tract_repro.launching.local import local_executor, wait


def _parser():
    parser = argparse.ArgumentParser(prog="python -m tract_repro.launch", description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", metavar="FILE.gin", help="gin files, parsed in order")
    parser.add_argument("--gin", action="append", default=[], metavar="'name = value'", help="extra binding (repeatable)")
    parser.add_argument("--workdir", help="run directory (default: runs/<last gin file's name>)")
    parser.add_argument("--executor", choices=["inline", "local", "slurm"], default="inline",
                        help="inline: in this process; local: through submitit's local executor; slurm: a SLURM job "
                             "(options from gin: slurm.partition, slurm.gpus_per_node, slurm.time_min, ...)")
    parser.add_argument("--wait", action="store_true",
                        help="with --executor slurm: block until the job (through requeues) finishes; exit 1 if it failed")
    parser.add_argument("--seeds", nargs="+", metavar="SEED",  # checked as whole numbers ≥ 0 by seeds.seed_runs
                        help="one run per seed (binds train.seed); --workdir must contain {seed}")
    parser.add_argument("--parallel", type=int, default=1,
                        help="with --seeds: how many runs at once (inline: forked processes; local: submitit jobs)")
    parser.add_argument("--no-pace", action="store_true",
                        help="with --seeds inline: let the forked runs drift apart (by default a run ahead of the others waits)")
    return parser


@command
def main(argv=None):
    args = _parser().parse_args(argv)
    workdir = Path(args.workdir or Path("runs") / Path(args.files[-1]).stem)
    if args.seeds:
        runs = seeds.seed_runs(args.files, args.gin, workdir, args.seeds)
        seeds.submit(runs, args.executor, args.parallel, not args.no_pace, args.wait)
        return 0
    text = config.parse(args.files, args.gin)
    jobs.check_options()
    if jobs.check_workdir(workdir, text) == "complete":
        print(f"{workdir} is already complete (ema.pt present); nothing to do")
        return 0
    jobs.check_teacher()
    if args.executor == "slurm":
        slurm.submit_runs([(workdir, text)], args.wait)
        return 0
    if args.executor == "inline":
        result = jobs.run_job(text, workdir)
    else:
        job = local_executor(workdir / "submitit").submit(jobs.run_job, text, str(workdir))
        print(f"submitted job {job.job_id}; logs in {workdir / 'submitit'}", flush=True)
        result = wait(job)
    print(f"done: {result}")
    return 0


if __name__ == "__main__":
    from tract_repro.launching.process import exit_now

    exit_now(main())
