"""A project command run as a job, waited for: ``--executor local`` (launch's submitit-local executor) or
``--executor slurm`` (one task on one GPU with the ``slurm.*`` options of ``--cluster FILE.gin``).

The job runs the same command line with ``--executor inline`` through the command's own job body, a module-level
function (so submitit pickles it by its module's name, also when the command ran as ``__main__``).  Its logs go to
``runs/jobs/<output path>`` (``runs/`` is not version-controlled).  Used by ``python -m tract_repro.evaluation.fid``
and ``python -m tract_repro.encode_latents``.
"""
import dataclasses
from pathlib import Path

JOBS = Path("runs/jobs")
EXECUTOR_OPTIONS = ("--executor", "--gin", "--cluster")


def job_folder(out):
    """Where the job computing ``out`` logs: under runs/jobs/, named after ``out``."""
    return JOBS / str(Path(out).with_suffix("")).strip("/").replace("/", "_")


def inline(argv):
    """The same command line with ``--executor inline`` (and without the executor's options)."""
    out, skip = [], 0
    for a in argv:
        if skip:
            skip -= 1
        elif a in EXECUTOR_OPTIONS:
            skip = 1
        elif not a.startswith(tuple(f"{o}=" for o in EXECUTOR_OPTIONS)):
            out.append(a)
    return out + ["--executor", "inline"]


def submit(body, argv, kind, cluster, gin_bindings, folder, name):
    """Run ``body(inline(argv))`` as a ``kind`` ('local' or 'slurm') job named ``name`` and wait for it.

    ``cluster`` (a gin file) and ``gin_bindings`` give the executor's options (``slurm.*``, ``local_executor.*``);
    a SLURM job keeps the partition, time limit and so on, but asks for one node, one task and at most one GPU.
    """
    from tract_repro import config
    from tract_repro.launching import local, slurm

    config.parse([cluster] if cluster else [], gin_bindings)
    if kind == "local":
        job = local.local_executor(folder).submit(body, inline(argv))
        print(f"submitted job {job.job_id}; logs in {folder}", flush=True)
        return local.wait(job)
    options = slurm.SlurmOptions()
    options = dataclasses.replace(options, nodes=1, tasks_per_node=1, gpus_per_node=min(options.gpus_per_node, 1))
    slurm.check_available()
    job = slurm.submit_run(slurm.SlurmRun(body, inline(argv)), folder, options, default_name=name)
    print(f"submitted SLURM job {job.job_id}; logs in {folder}", flush=True)
    return slurm.wait(job)
