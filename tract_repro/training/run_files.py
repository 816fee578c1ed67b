"""The run-directory writer: everything a run leaves in its folder, written by rank 0 alone.

``config.gin`` (the configuration as given), ``operative_config.gin`` (every value used),
``run.json``, ``metrics.jsonl``, ``checkpoints/ckpt_<samples>.pt``, ``samples/*.png``,
``tensorboard/`` (:mod:`tract_repro.training.tensorboard`) and, when finished, ``ema.pt`` (the
inference EMA's denoiser weights).  While a trainer runs in it the folder
is locked (``.lock``, an OS lock that dies with its holder): a second trainer is refused in one line, except that a
requeued SLURM job waits a while for its own previous instance to exit.
Nothing is written before the run's configuration has been checked.
"""
import contextlib
import fcntl
import json
import os
import time
from pathlib import Path

import gin

from tract_repro.common.errors import ConfigError, one_line
from tract_repro.common.files import write_json, write_text
from tract_repro.sampling.images import save_grid
from tract_repro.training import checkpoint as ckpt


#: how long a requeued SLURM job waits for its previous instance to let go of the folder's lock
REQUEUE_LOCK_WAIT_S = 120


def _acquire(lock, path):
    """Take the folder's lock; False if another trainer holds it.  A requeued SLURM job (SLURM_RESTART_COUNT ≥ 1)
    first waits up to REQUEUE_LOCK_WAIT_S for the holder to exit: its own previous instance may still be
    shutting down when SLURM starts it again (a lock dies with its holder, so the wait ends when that one does)."""
    restarts = os.environ.get("SLURM_RESTART_COUNT", "0")
    deadline = time.monotonic() + (REQUEUE_LOCK_WAIT_S if restarts.isdigit() and int(restarts) > 0 else 0)
    told = False
    while True:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            if not told:
                lock.seek(0)
                waiting_for(path, lock.read().strip() or "unknown")
                told = True
            time.sleep(0.1)


def waiting_for(path, holder):
    print(f"{path} is still locked by pid {holder} (this job's previous instance?): requeued, so waiting up to "
          f"{REQUEUE_LOCK_WAIT_S} s for it to exit", flush=True)


class RunDirectory:
    """Writes a run's folder; on ranks other than 0 (``main = False``) every write is skipped."""

    def __init__(self, path, main=True, keep_checkpoints=2):
        self.path, self.main, self.keep = Path(path), main, keep_checkpoints
        self.metrics = MetricsLog(self.path / "metrics.jsonl")
        self.started = False  # whether this run has written its start files (run.json)

    @property
    def checkpoints(self):
        return self.path / "checkpoints"

    @property
    def tensorboard(self):
        return self.path / "tensorboard"

    def checkpoint_path(self, samples):
        return ckpt.checkpoint_path(self.checkpoints, samples)

    @contextlib.contextmanager
    def locked(self):
        """Hold the folder's lock while training; a folder this created for a run that failed before writing
        anything is removed again, so that a failed start leaves nothing behind."""
        if not self.main:
            yield
            return
        created = not self.path.exists()
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            lock = open(self.path / ".lock", "a+")
        except OSError as exc:
            raise ConfigError(f"cannot write the run directory {self.path} ({exc.strerror}): choose a --workdir "
                              f"you can write to") from None
        if not _acquire(lock, self.path):
            lock.seek(0)
            holder = lock.read().strip() or "unknown"
            lock.close()
            raise ConfigError(f"{self.path} is in use by another trainer (pid {holder}): let it finish, or stop it "
                              f"(kill {holder}) and run this command again") from None
        lock.truncate(0)
        lock.write(f"{os.getpid()}\n")
        lock.flush()
        try:
            yield
        except BaseException:
            if created and {p.name for p in self.path.iterdir()} == {".lock"}:
                (self.path / ".lock").unlink()
                self.path.rmdir()
            raise
        finally:
            lock.close()

    def start(self, info, config_text=None):
        """``config.gin`` (if given), the operative config and run.json of a run that starts or resumes."""
        if self.main:
            self.path.mkdir(parents=True, exist_ok=True)
            if config_text is not None:
                write_text(self.path / "config.gin", config_text)
            write_text(self.path / "operative_config.gin", gin.operative_config_str())
            write_json(self.path / "run.json", info)
            self.started = True

    def fail(self, info, exc):
        """run.json of a run that raised: ``status: "failed"`` and the one-line reason (``error``).  Only once this
        run has written its start files (a run that fails before leaves nothing); never masks ``exc``."""
        if self.main and self.started:
            try:
                write_json(self.path / "run.json", dict(info, status="failed", error=one_line(exc)))
            except OSError:
                pass

    def relaunch_advice(self):
        """How to launch the corrected command of a run that fails now: a run without checkpoints restarts in its
        folder (see :func:`restartable`), one with checkpoints needs a new folder."""
        if has_checkpoints(self.path):
            return (f"launch it with a new --workdir ({self.path} keeps the checkpoints of this configuration), "
                    f"or delete {self.path} to start over")
        return f"then launch again: a failed run without checkpoints restarts in {self.path} with the new settings"

    def save_checkpoint(self, state):
        """A checkpoint of ``state`` (a dict), the oldest ones pruned, and the operative config as it now stands."""
        if self.main:
            ckpt.save_atomic(state, self.checkpoint_path(state["samples"]))
            ckpt.prune(self.checkpoints, self.keep)
            write_text(self.path / "operative_config.gin", gin.operative_config_str())  # now with the loop's own calls

    def save_grid(self, name, images, scale):
        if self.main:
            save_grid(images, self.path / "samples" / name, scale=scale)

    def finish(self, weights, info):
        """ema.pt (the evaluated weights, the next run's teacher) and the completed run.json."""
        if self.main:
            ckpt.save_atomic(weights, self.path / "ema.pt")
            write_json(self.path / "run.json", info)


def has_checkpoints(path):
    """Whether run directory ``path`` holds a checkpoint (usable or not) or its final ema.pt."""
    checkpoints = Path(path) / "checkpoints"
    return (Path(path) / "ema.pt").exists() or (checkpoints.is_dir() and any(checkpoints.iterdir()))


def restartable(path):
    """Whether ``path`` holds a failed run (run.json status "failed") with no checkpoint and no ema.pt: nothing
    in it is worth resuming, so the launcher lets it restart from sample 0 with a changed configuration."""
    try:
        info = json.loads((Path(path) / "run.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(info, dict) and info.get("status") == "failed" and not has_checkpoints(path)


class MetricsLog:
    """Means of per-step metrics over each logging interval, appended as JSON lines."""

    def __init__(self, path):
        self.path = Path(path)
        self.sums, self.count, self.last_samples_flushed = {}, 0, 0
        self.last_record = None  # the newest record in the file

    def add(self, **values):
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.count += 1

    def flush(self, **extra):
        record = dict(extra)
        record.update({k: v / self.count for k, v in self.sums.items()} if self.count else {})
        self.sums, self.count = {}, 0
        return record

    def write(self, record):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        self.last_samples_flushed, self.last_record = record["samples"], record

    def partial(self):
        """The sums of the interval not yet written (a checkpoint keeps them, so that a run stopped between two
        records writes the next one as an uninterrupted run does)."""
        return dict(sums=dict(self.sums), count=self.count)

    def restore(self, partial):
        self.sums, self.count = dict(partial["sums"]), int(partial["count"])

    def truncate(self, samples):
        """On resume: keep only records up to the checkpoint's sample count."""
        if not self.path.is_file():
            return
        kept = [line for line in self.path.read_text().splitlines() if line and json.loads(line)["samples"] <= samples]
        write_json_lines(self.path, kept)
        self.last_record = json.loads(kept[-1]) if kept else None
        self.last_samples_flushed = self.last_record["samples"] if kept else 0


def write_json_lines(path, lines):
    write_text(path, "".join(line + "\n" for line in lines))
