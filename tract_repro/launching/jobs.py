"""The body of every training job, whichever executor runs it: parse the config text, write it beside
the run, and train (method-spec §3-5 through :func:`tract_repro.training.loop.train`).

A job gets the configuration as text and re-parses it in its own process, so inline, forked,
submitit-local and SLURM runs take the same path.
"""
import os
from pathlib import Path

from tract_repro import config
from tract_repro.common.errors import ConfigError
from tract_repro.training import checkpoint as ckpt
from tract_repro.training.run_files import restartable


def run_job(config_text, workdir, pace=None):
    """Parse ``config_text`` and train; the run writes it to ``<workdir>/config.gin`` once it has been
    checked (a configuration that fails leaves no file behind).  Returns the workdir as text.

    ``pace``: a :class:`~tract_repro.launching.pacing.Pace`, given to forked seeds that keep level.
    """
    from tract_repro.training.loop import train

    export_distributed_environment()  # in a multi-task submitit job: RANK, WORLD_SIZE, … for torch's env://
    config.parse(text=config_text)
    return str(train(Path(workdir), pace=pace, config_text=config_text))


def train_job(config_text, workdir):
    """A submitted job's body: train, or do nothing if the run is already complete; returns the workdir."""
    if check_workdir(workdir, config_text) == "complete":
        print(f"{workdir} is already complete", flush=True)
        return str(workdir)
    found = ckpt.list_checkpoints(Path(workdir) / "checkpoints")
    print(f"training {workdir}: " + (f"resuming from {found[-1].name}" if found else "no checkpoint yet"), flush=True)
    return run_job(config_text, workdir)


def check_workdir(workdir, config_text):
    """Refuse a run directory that holds a run of a different configuration; 'complete' if it is finished.

    A run that failed before its first checkpoint (run.json status "failed", e.g. a diverged loss) holds nothing
    worth resuming: it restarts from sample 0 with the corrected configuration instead of being refused.
    """
    saved = Path(workdir) / "config.gin"
    if saved.is_file() and saved.read_text() != config_text and not restartable(workdir):
        raise ConfigError(f"{workdir} holds a run with a different configuration: pass a new --workdir "
                          f"(or delete {workdir} to start over)")
    if (Path(workdir) / "ema.pt").is_file() and saved.is_file():
        return "complete"
    return None


def check_options():
    """Fail fast, before anything is written or submitted, on options a run cannot train with (the parsed config's)."""
    from tract_repro.config.runs import resolved_options

    resolved_options().check()


def check_teacher():
    """Fail fast, before anything is submitted, if the bound ``train.teacher`` is missing or unfinished."""
    if config.query("train.teacher") is not None:
        from tract_repro.training.teacher import resolve

        resolve(config.query("train.teacher"))


def export_distributed_environment(pin_gpus=False):
    """In a multi-task submitit job: MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE, LOCAL_RANK (torch's env://)."""
    if not os.environ.get("SUBMITIT_EXECUTOR"):
        return None
    import submitit

    if submitit.JobEnvironment().num_tasks <= 1:
        return None
    return submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=pin_gpus, overwrite=True)
