"""What a job asks of its executor, bound in gin: ``slurm.*`` and ``local_executor.*``.

These are options only, checked when they are made; :mod:`tract_repro.launching` turns them into
submitit executors.
"""
import dataclasses

import gin

from tract_repro.common.errors import ConfigError


def _need(ok, configurable, name, value, what):
    if not ok:
        raise ConfigError(f"{configurable}.{name} = {value!r}: {what}")


def _whole(value, least):
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


@gin.configurable("slurm")
@dataclasses.dataclass(frozen=True)
class SlurmOptions:
    """What ``--executor slurm`` asks SLURM for.

    ``time_min`` is the time limit in minutes. SLURM sends USR2 ``signal_delay_s`` seconds
    before it. The run then checkpoints at a step boundary and requeues itself, at most
    ``timeout_requeues`` times for time limits (preemptions don't count). ``mem_gb = None``
    leaves memory to the partition's default. ``setup`` lists shell lines run before the job
    (``module load ...``). ``extra_sbatch`` is a dict of any other sbatch options, e.g.
    ``{'constraint': 'a100', 'exclusive': True}``.
    """

    partition: str = None
    account: str = None
    qos: str = None
    nodes: int = 1
    tasks_per_node: int = 1
    gpus_per_node: int = 0
    cpus_per_task: int = 1
    mem_gb: float = None
    time_min: int = 24 * 60
    signal_delay_s: int = 120
    timeout_requeues: int = 3
    job_name: str = None
    setup: tuple = ()
    extra_sbatch: dict = None

    def __post_init__(self):
        need = lambda ok, name, what: _need(ok, "slurm", name, getattr(self, name), what)  # noqa: E731
        for name in ("nodes", "tasks_per_node", "cpus_per_task"):
            need(_whole(getattr(self, name), 1), name, "give a whole number, at least 1")
        need(_whole(self.gpus_per_node, 0), "gpus_per_node", "give a whole number, at least 0")
        need(isinstance(self.time_min, (int, float)) and self.time_min >= 1, "time_min",
             "give the time limit in minutes, at least 1")
        need(isinstance(self.signal_delay_s, int) and 0 < self.signal_delay_s < self.time_min * 60, "signal_delay_s",
             f"give seconds before the time limit, between 1 and {int(self.time_min * 60) - 1}")
        need(_whole(self.timeout_requeues, 0), "timeout_requeues", "give a whole number, at least 0")
        need(self.mem_gb is None or (isinstance(self.mem_gb, (int, float)) and self.mem_gb > 0), "mem_gb",
             "give gigabytes, or None")
        for name in ("partition", "account", "qos", "job_name"):
            value = getattr(self, name)
            need(value is None or (isinstance(value, str) and value.strip()), name, "give a non-empty string, or None")
        need(isinstance(self.setup, (list, tuple)) and all(isinstance(line, str) for line in self.setup), "setup",
             "give a list of shell lines")
        need(self.extra_sbatch is None or (isinstance(self.extra_sbatch, dict)
                                           and all(isinstance(k, str) for k in self.extra_sbatch)),
             "extra_sbatch", "give a dict of sbatch options, e.g. {'constraint': 'a100'}")
        object.__setattr__(self, "setup", tuple(self.setup))

    @property
    def tasks(self):
        return self.nodes * self.tasks_per_node

    def sbatch_parameters(self, default_name):
        """submitit SlurmExecutor parameters (they become the ``#SBATCH`` lines)."""
        params = dict(job_name=self.job_name or default_name, time=int(self.time_min), nodes=self.nodes,
                      ntasks_per_node=self.tasks_per_node, cpus_per_task=self.cpus_per_task,
                      signal_delay_s=int(self.signal_delay_s))
        optional = dict(partition=self.partition, account=self.account, qos=self.qos,
                        gpus_per_node=self.gpus_per_node or None, setup=list(self.setup) or None,
                        additional_parameters=dict(self.extra_sbatch) if self.extra_sbatch else None)
        if self.mem_gb:
            optional["mem"] = f"{int(self.mem_gb)}GB" if self.mem_gb == int(self.mem_gb) else f"{int(self.mem_gb * 1024)}MB"
        params.update({k: v for k, v in optional.items() if v is not None})
        return params


@gin.configurable("local_executor")
@dataclasses.dataclass(frozen=True)
class LocalOptions:
    """submitit's local executor: the job runs in a fresh process, or in ``tasks_per_node`` processes
    that train data-parallel (:mod:`tract_repro.training.distributed`; gloo on the CPU).

    submitit hides every GPU from a local job unless it asks for some, so by default
    (``gpus_per_node = None``) each job sees all of this machine's GPUs (local jobs share them);
    ``gpus_per_node = 0`` hides them.
    """

    timeout_min: int = 24 * 60
    cpus_per_task: int = None
    gpus_per_node: int = None
    tasks_per_node: int = 1

    def __post_init__(self):
        _need(_whole(self.tasks_per_node, 1), "local_executor", "tasks_per_node", self.tasks_per_node, "give at least 1")
        _need(self.gpus_per_node is None or _whole(self.gpus_per_node, 0), "local_executor", "gpus_per_node",
              self.gpus_per_node, "give a whole number, at least 0, or None for every GPU")
