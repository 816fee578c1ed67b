"""Runs on SLURM through submitit: ``python -m tract_repro.launch FILE.gin --executor slurm [--wait]``.

What the job asks SLURM for is bound in gin, with ``slurm.partition = 'gpu'``,
``slurm.time_min = 720`` and so on (:class:`tract_repro.config.executors.SlurmOptions`). The job gets the config as text and
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
import io
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import submitit
from submitit.helpers import Checkpointable

from tract_repro import config
from tract_repro.common.errors import ConfigError, JobFailed
from tract_repro.common.files import write_text
from tract_repro.config.executors import SlurmOptions
from tract_repro.launching.jobs import export_distributed_environment, train_job
from tract_repro.launching.local import failure_line
from tract_repro.training import preemption

LOGS = "slurm"  # under the workdir
LIVE = {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESIZING",
        "SUSPENDED", "SIGNALING", "STAGE_OUT", "STOPPED"}  # job states that may still produce a result


def check_available():
    """Raise ConfigError in one line if this machine can't submit SLURM jobs."""
    if shutil.which("sbatch") is None or shutil.which("srun") is None:
        raise ConfigError("--executor slurm needs SLURM's sbatch and srun on PATH: run the launcher on a cluster's "
                          "login node, or start a single-node test cluster with `sudo .ci/slurm-up` and "
                          "`export SLURM_CONF=/tmp/tract-slurm/etc/slurm.conf`")


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
            raise JobFailed(str(self._outcome["stopped"]))
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
    write_text(workdir / LOGS / "latest_job", f"{job.job_id} {options.tasks}\n")  # see live_job()
    write_text(workdir / "config.gin", config_text)  # so that a different config for this workdir is refused
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
    """Block until the job has a result, through any requeues; return it, or raise JobFailed in one line.

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
                raise JobFailed(f"job {job.job_id} ended {state[0]} without a result: see {job.paths.stderr}")
            next_check, interval = now + (1.0 if ended else interval), min(interval * 1.5, max_poll_s)
        time.sleep(1.0)
    return _results(job)


def _results(job):
    try:
        results = job.results()
    except submitit.core.utils.UncompletedJobError as exc:
        raise JobFailed(f"job {job.job_id} failed: {failure_line(exc)}") from None
    return results[0]


def submit_runs(runs, wait_for_them=False):
    """Submit each (workdir, config text) as a SLURM job, unless SLURM is already queueing or running it;
    with ``wait_for_them``, wait for them all, then raise :class:`JobFailed` if any failed."""

    jobs = []
    for run_dir, text in runs:
        config.parse(text=text)
        options = SlurmOptions()  # the gin-bound slurm.* options, checked
        check_available()
        job = live_job(run_dir)
        if job is not None:
            print(f"{run_dir} is already queued or running as SLURM job {job.job_id}: not submitted again", flush=True)
        else:
            job = submit(text, run_dir, options)
            print(f"submitted SLURM job {job.job_id}; logs in {Path(run_dir) / LOGS / job.job_id}", flush=True)
        jobs.append(job)
    if wait_for_them:
        wait_all(jobs)


def wait_all(jobs):
    """Wait for every job, printing each result; :class:`JobFailed` in one line if any failed."""
    failed = []
    try:
        for job in jobs:
            try:
                print(f"done: {wait(job)}", flush=True)
            except JobFailed as exc:
                failed.append(str(exc))
    except KeyboardInterrupt:
        ids = " ".join(j.job_id for j in jobs)
        raise JobFailed(f"interrupted; the SLURM jobs keep running (scancel {ids} stops them)") from None
    if failed:
        raise JobFailed(failed[0] if len(jobs) == 1 else f"{len(failed)} of {len(jobs)} jobs failed; first: {failed[0]}")
