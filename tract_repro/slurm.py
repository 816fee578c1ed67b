"""Runs on SLURM through submitit: ``python -m tract_repro.launch FILE.gin --executor slurm [--wait]``.

What the job asks SLURM for is bound in gin, with ``slurm.partition = 'gpu'``,
``slurm.time_min = 720`` and so on (see :func:`slurm`). The job gets the config as text and
re-parses it, as with the local executor. Its logs and submitit's pickles go to
``<workdir>/slurm/<job id>/``.

**Checkpoint and requeue.** submitit installs a handler for SLURM's pre-timeout signal (USR2,
sent ``signal_delay_s`` before the time limit, or by preemption tooling) in the job's main
thread. The handler calls the submitted callable's ``checkpoint()``, pickles what it returns as
the job's new submission, runs ``scontrol requeue`` and then calls ``sys.exit``. That exit is
raised from whatever the main thread was doing at that moment. If training ran in the main
thread, it could land between a backward pass and ``optimizer.step()``. So :class:`SlurmRun`
keeps the main thread free:

1. ``__call__`` starts ``train()`` in a worker thread and waits for it, waking every second.
   The handler therefore runs while the main thread waits, never inside a training step.
2. ``checkpoint()`` (main thread, inside the handler) sets the stop request of
   :mod:`tract_repro.training.preemption`, then waits for the worker to finish. After each
   complete step, the loop's ``preemption.at_step_boundary`` sees the request. It writes a normal
   checkpoint of that step and raises ``Stopped``, which ends the worker.
3. ``checkpoint()`` returns the resubmission, and submitit requeues and exits. The requeued job
   finds that checkpoint and resumes exactly from it, as after any interruption.

If no step boundary comes within ``signal_delay_s - 20`` seconds (for example when the file
system hangs), ``checkpoint()`` stops waiting and requeues anyway. The run then resumes from its
newest earlier checkpoint. A forced requeue or preemption without the signal (``scontrol
requeue``, a node failure) also resumes from the newest checkpoint. Checkpoints are written
atomically, so one is never half-written.

Only task 0 handles the signal: submitit ignores it on other ranks. A job with
``tasks_per_node * nodes > 1`` exports MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE, LOCAL_RANK and
LOCAL_WORLD_SIZE in every task, through submitit's ``TorchDistributedEnvironment``, before
training starts.
"""
import contextlib
import dataclasses
import io
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import gin
import submitit
from submitit.helpers import Checkpointable

from tract_repro.training import preemption

LOGS = "slurm"  # under the workdir
LIVE = {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESIZING",
        "SUSPENDED", "SIGNALING", "STAGE_OUT", "STOPPED"}  # job states that may still produce a result


class ConfigError(ValueError):
    """A SLURM option is invalid, or SLURM refused the job (nothing was submitted)."""


@dataclasses.dataclass(frozen=True)
class SlurmOptions:
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


@gin.configurable
def slurm(partition=None, account=None, qos=None, nodes=1, tasks_per_node=1, gpus_per_node=0, cpus_per_task=1,
          mem_gb=None, time_min=24 * 60, signal_delay_s=120, timeout_requeues=3, job_name=None, setup=(),
          extra_sbatch=None):
    """What ``--executor slurm`` asks SLURM for.

    ``time_min`` is the time limit in minutes. SLURM sends USR2 ``signal_delay_s`` seconds
    before it. The run then checkpoints at a step boundary and requeues itself, at most
    ``timeout_requeues`` times for time limits (preemptions don't count). ``mem_gb = None``
    leaves memory to the partition's default. ``setup`` lists shell lines run before the job
    (``module load ...``). ``extra_sbatch`` is a dict of any other sbatch options, e.g.
    ``{'constraint': 'a100', 'exclusive': True}``.
    """
    def need(ok, name, value, what):
        if not ok:
            raise ConfigError(f"slurm.{name} = {value!r}: {what}")

    for name, value in dict(nodes=nodes, tasks_per_node=tasks_per_node, cpus_per_task=cpus_per_task).items():
        need(isinstance(value, int) and value >= 1, name, value, "give a whole number, at least 1")
    need(isinstance(gpus_per_node, int) and gpus_per_node >= 0, "gpus_per_node", gpus_per_node, "give a whole number, at least 0")
    need(isinstance(time_min, (int, float)) and time_min >= 1, "time_min", time_min, "give the time limit in minutes, at least 1")
    need(isinstance(signal_delay_s, int) and 0 < signal_delay_s < time_min * 60, "signal_delay_s", signal_delay_s,
         f"give seconds before the time limit, between 1 and {int(time_min * 60) - 1}")
    need(isinstance(timeout_requeues, int) and timeout_requeues >= 0, "timeout_requeues", timeout_requeues,
         "give a whole number, at least 0")
    need(mem_gb is None or (isinstance(mem_gb, (int, float)) and mem_gb > 0), "mem_gb", mem_gb, "give gigabytes, or None")
    for name, value in dict(partition=partition, account=account, qos=qos, job_name=job_name).items():
        need(value is None or (isinstance(value, str) and value.strip()), name, value, "give a non-empty string, or None")
    need(isinstance(setup, (list, tuple)) and all(isinstance(line, str) for line in setup), "setup", setup,
         "give a list of shell lines")
    need(extra_sbatch is None or (isinstance(extra_sbatch, dict) and all(isinstance(k, str) for k in extra_sbatch)),
         "extra_sbatch", extra_sbatch, "give a dict of sbatch options, e.g. {'constraint': 'a100'}")
    return SlurmOptions(partition, account, qos, nodes, tasks_per_node, gpus_per_node, cpus_per_task, mem_gb,
                        time_min, signal_delay_s, timeout_requeues, job_name, tuple(setup), extra_sbatch)


def check_available():
    """Raise ConfigError in one line if this machine can't submit SLURM jobs."""
    if shutil.which("sbatch") is None or shutil.which("srun") is None:
        raise ConfigError("--executor slurm needs SLURM's sbatch and srun on PATH: run the launcher on a cluster's "
                          "login node, or start a single-node test cluster with `sudo .ci/slurm-up` and "
                          "`export SLURM_CONF=/tmp/tract-slurm/etc/slurm.conf`")


def train_job(config_text, workdir):
    """The job body: train (or do nothing if the run is already complete); returns the workdir."""
    from tract_repro import launch
    from tract_repro.training import checkpoint as ckpt

    if launch.check_workdir(workdir, config_text) == "complete":
        print(f"{workdir} is already complete", flush=True)
        return str(workdir)
    found = ckpt.list_checkpoints(Path(workdir) / "checkpoints")
    print(f"training {workdir}: " + (f"resuming from {found[-1].name}" if found else "no checkpoint yet"), flush=True)
    return launch.run_job(config_text, workdir)


class SlurmRun(Checkpointable):
    """``function(*args)`` run in a worker thread; ``checkpoint()`` stops it at a step boundary first."""

    def __init__(self, function, *args, wait_s=100, pin_gpus=False):
        self.function, self.args, self.wait_s, self.pin_gpus = function, args, wait_s, pin_gpus
        self._done, self._outcome, self._thread = None, None, None

    def __getstate__(self):  # what checkpoint() pickles for the requeued job: no threads or events
        return dict(function=self.function, args=self.args, wait_s=self.wait_s, pin_gpus=self.pin_gpus)

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._done, self._outcome, self._thread = None, None, None

    def __call__(self):
        export_distributed_environment(pin_gpus=self.pin_gpus)
        preemption.reset()
        if os.environ.get("SUBMITIT_EXECUTOR"):
            print(f"started: {submitit.JobEnvironment()}", flush=True)
        self._done, self._outcome = threading.Event(), {}
        self._thread = threading.Thread(target=self._work, name="train", daemon=True)
        self._thread.start()
        while not self._done.wait(1.0):  # signal handlers run here, between waits
            pass
        if "error" in self._outcome:
            raise self._outcome["error"]
        if "stopped" in self._outcome:  # a stop request that didn't come through checkpoint()
            raise RuntimeError(str(self._outcome["stopped"]))
        return self._outcome["value"]

    def _work(self):
        try:
            self._outcome["value"] = self.function(*self.args)
        except preemption.Stopped as exc:
            self._outcome["stopped"] = exc
        except BaseException as exc:  # noqa: BLE001  (handed to the main thread)
            self._outcome["error"] = exc
        finally:
            self._done.set()

    def checkpoint(self, *args, **kwargs):
        """Called by submitit's signal handler in the main thread; returns the resubmission."""
        if self._thread is not None and self._thread.is_alive():
            print("preemption or time-limit signal: checkpointing at the next step boundary", flush=True)
            preemption.request_stop()
            if not self._done.wait(self.wait_s):
                print(f"no step boundary within {self.wait_s} s: requeueing without a new checkpoint", flush=True)
        return super().checkpoint(*args, **kwargs)


def export_distributed_environment(pin_gpus=False):
    """In a multi-task submitit job: MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE, LOCAL_RANK (torch's env://)."""
    if not os.environ.get("SUBMITIT_EXECUTOR"):
        return None
    if submitit.JobEnvironment().num_tasks <= 1:
        return None
    return submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=pin_gpus, overwrite=True)


def submit(config_text, workdir, options):
    """Submit the run as one SLURM job, logging to ``<workdir>/slurm``; returns the submitit job."""
    workdir = Path(workdir).resolve()
    run = SlurmRun(train_job, config_text, str(workdir), wait_s=max(5, options.signal_delay_s - 20),
                   pin_gpus=options.gpus_per_node > 0 and options.gpus_per_node == options.tasks_per_node)
    existed = workdir.exists()
    try:
        job = submit_run(run, workdir / LOGS, options, default_name=f"tract-{workdir.name}")
    except ConfigError:
        if not existed:  # leave nothing behind for a job that was never queued
            shutil.rmtree(workdir, ignore_errors=True)
        raise
    (workdir / LOGS / "latest_job").write_text(f"{job.job_id} {options.tasks}\n")  # see live_job()
    (workdir / "config.gin").write_text(config_text)  # so that a different config for this workdir is refused
    return job


def submit_run(run, folder, options, default_name="tract"):
    """Submit a :class:`SlurmRun` with ``options``; ConfigError in one line if sbatch refuses it."""
    executor = submitit.SlurmExecutor(folder=Path(folder) / "%j", max_num_timeout=options.timeout_requeues)
    executor.update_parameters(**options.sbatch_parameters(default_name))
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # submitit prints sbatch's complaints; we report one line
            return executor.submit(run)
    except (submitit.core.utils.FailedJobError, submitit.core.utils.FailedSubmissionError) as exc:
        lines = [line.strip() for line in str(exc).splitlines() if "error" in line.lower()] or [str(exc).strip()]
        raise ConfigError(f"SLURM refused the job: {lines[0]}") from None


def job_state(job_id):
    """SLURM's state and reason for the job ('RUNNING', 'None'); ('GONE', ...) if SLURM forgot it; None if unreachable."""
    try:
        out = subprocess.run(["squeue", "-h", "-t", "all", "-j", str(job_id), "-o", "%T|%r"], capture_output=True,
                             text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode == 0 and out.stdout.strip():
        state, _, reason = out.stdout.strip().splitlines()[0].partition("|")
        return state, reason
    if out.returncode == 0 or "invalid job id" in out.stderr.lower():
        try:
            acct = subprocess.run(["sacct", "-n", "-X", "-P", "-j", str(job_id), "-o", "State"], capture_output=True,
                                  text=True, timeout=60)
            if acct.returncode == 0 and acct.stdout.strip():
                return acct.stdout.split()[0], "from sacct"
        except (OSError, subprocess.TimeoutExpired):
            pass
        return "GONE", "no longer known to squeue or sacct"
    return None


def live_job(workdir):
    """The submitit job of a run that SLURM is still queueing or running, or None."""
    record = Path(workdir) / LOGS / "latest_job"
    if not record.is_file():
        return None
    job_id, tasks = record.read_text().split()
    state = job_state(job_id)
    if state is None or state[0] not in LIVE:
        return None
    return submitit.SlurmJob(folder=Path(workdir).resolve() / LOGS / "%j", job_id=job_id, tasks=list(range(int(tasks))))


def wait(job, grace_s=20, max_poll_s=30):
    """Block until the job has a result, through any requeues; return it, or raise RuntimeError in one line.

    Results are files written by the job (checked every second); SLURM's state (squeue, or sacct
    once the job has left the queue) is read every few seconds, to report changes and to notice a
    job that ended without a result (cancelled, killed at its time limit, node failure).
    """
    tasks = [job.task(i) for i in range(job.num_tasks)]
    last, ended_since, next_check, interval = None, None, 0.0, 2.0
    while not all(t.paths.result_pickle.exists() for t in tasks):
        now = time.monotonic()
        if now >= next_check:
            state = job_state(job.job_id)
            if state is not None and state != last:
                print(f"job {job.job_id}: {state[0]}" + (f" ({state[1]})" if state[1] not in ("", "None") else ""),
                      flush=True)
                last = state
            ended = state is not None and state[0] not in LIVE
            ended_since = (ended_since or now) if ended else None
            if ended and now - ended_since > grace_s:
                raise RuntimeError(f"job {job.job_id} ended {state[0]} without a result: see {job.paths.stderr}")
            next_check, interval = now + (1.0 if ended else interval), min(interval * 1.5, max_poll_s)
        time.sleep(1.0)
    return _results(job)


def _results(job):
    from tract_repro.launch import failure_line

    try:
        results = job.results()
    except submitit.core.utils.UncompletedJobError as exc:
        raise RuntimeError(f"job {job.job_id} failed: {failure_line(exc)}") from None
    return results[0]
