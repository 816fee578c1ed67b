"""submitit's local executor, with the options bound in gin (``local_executor.*``): jobs on this machine."""
import re

from tract_repro.common.errors import JobFailed
from tract_repro.config.executors import LocalOptions


def local_executor(folder, options=None):
    """A submitit LocalExecutor logging to ``folder``, with ``options`` (default: the gin-bound :class:`LocalOptions`)."""
    import submitit
    import torch

    options = options or LocalOptions()
    executor = submitit.LocalExecutor(folder=folder)
    gpus = torch.cuda.device_count() if options.gpus_per_node is None else options.gpus_per_node
    params = dict(timeout_min=options.timeout_min, gpus_per_node=gpus, tasks_per_node=options.tasks_per_node)
    if options.cpus_per_task:
        params["cpus_per_task"] = options.cpus_per_task
    executor.update_parameters(**params)
    return executor


def failure_line(exc):
    """The job's own exception line from a submitit error or a log, not the log paths around it
    ('ConfigError: …', without the exception's module path)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    errors = [line for line in lines if re.match(r"^[A-Za-z_][\w.]*(Error|Exception|Diverged)\b.*:", line)]
    return re.sub(r"^(?:[A-Za-z_]\w*\.)+(?=\w+:)", "", (errors or lines or [str(exc)])[-1])


def wait(job):
    """The result of a submitit job (task 0's, for a data-parallel job); :class:`JobFailed` in one line if it failed."""
    import submitit

    try:
        return job.results()[0]  # a job of several tasks (data-parallel) has one result per task
    except submitit.core.utils.FailedJobError as exc:  # report the job's own exception line, not the log paths
        raise JobFailed(f"job {job.job_id} failed: {failure_line(exc)}") from None
