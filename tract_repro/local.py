"""submitit's local executor, configured in gin (``local_executor.*``): jobs on this machine."""
import gin


@gin.configurable
def local_executor(folder, timeout_min=24 * 60, cpus_per_task=None, gpus_per_node=None, tasks_per_node=1):
    """submitit's local executor: the job runs in a fresh process, or in ``tasks_per_node`` processes
    that train data-parallel (:mod:`tract_repro.training.distributed`; gloo on the CPU).

    submitit hides every GPU from a local job unless it asks for some, so by default each job
    sees all of this machine's GPUs (local jobs share them); ``gpus_per_node = 0`` hides them.
    """
    import submitit
    import torch

    executor = submitit.LocalExecutor(folder=folder)
    gpus = torch.cuda.device_count() if gpus_per_node is None else int(gpus_per_node)
    if int(tasks_per_node) < 1:
        raise ValueError(f"local_executor.tasks_per_node = {tasks_per_node}: give at least 1")
    params = dict(timeout_min=timeout_min, gpus_per_node=gpus, tasks_per_node=int(tasks_per_node))
    if cpus_per_task:
        params["cpus_per_task"] = cpus_per_task
    executor.update_parameters(**params)
    return executor
