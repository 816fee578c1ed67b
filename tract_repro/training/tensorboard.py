"""TensorBoard logs of training, in ``<run>/tensorboard/`` (gin: ``train.tensorboard``, on by default).

Why TensorBoard: the official TRACT code (apple/ml-tract) logs its training there, against training
samples as here, so its curves and this project's open side by side in one viewer
(``tensorboard --logdir runs/``); NVlabs/edm keeps JSON lines (``stats.jsonl``), as ``metrics.jsonl``
does here.  The tables keep coming from ``metrics.jsonl`` through DVC plots; dvclive was not chosen
because it would be a second path for those same metrics.

What is logged is what the loop already has, at the moments it already has it: every scalar of a
``metrics.jsonl`` record as ``train/<key>`` (loss, gradient norm, learning rate, samples/s, phase,
student steps) and every sample grid it saves as ``samples/<K>_steps`` (the PNG's own pixels), all at
the run's count of training samples, its x-axis.  Nothing is computed for the log alone.

An interrupted run resumed from a checkpoint logs like one that was never interrupted: what the
killed run logged after that checkpoint is purged (TensorBoard's own ``purge_step``, as
``metrics.jsonl`` is truncated), and the log is flushed with every checkpoint, so that what came
before it outlives a SIGKILL.  tensorboard is an optional extra: without it a run says so in one line
and trains on without this log.
"""
import functools
import re
import time

from tract_repro.sampling.images import grid_image

INSTALL = "pip install tensorboard (or set train.tensorboard = False)"


class Off:
    """No TensorBoard log: switched off, a rank other than 0, or tensorboard not installed."""

    def scalars(self, record):
        pass

    def grid(self, student_steps, samples, images, scale):
        pass

    def flush(self):
        pass

    def close(self):
        pass


class Board:
    """A run's TensorBoard log, written through torch's ``SummaryWriter``."""

    def __init__(self, writer):
        self.writer, self.grids = writer, set()

    def scalars(self, record):
        """A ``metrics.jsonl`` record: each of its numbers but the sample count, at that count."""
        for key, value in record.items():
            if key != "samples" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(f"train/{key}", value, record["samples"])

    def grid(self, student_steps, samples, images, scale):
        """A sample grid of ``student_steps``-step samples (N, C, H, W) in [−1, 1], as its PNG shows it."""
        if (student_steps, samples) in self.grids:  # the final grid repeats one saved at the last step
            return
        self.grids.add((student_steps, samples))
        self.writer.add_image(f"samples/{student_steps}_steps", grid_image(images, scale=scale), samples,
                              dataformats="CHW")

    def flush(self):
        self.writer.flush()

    def close(self):
        self.writer.close()


def open_board(folder, purge_from, enabled=True, warn=functools.partial(print, flush=True)):
    """The log in ``folder``; events an earlier process wrote there at ``purge_from`` samples or later are purged.

    Returns :class:`Off` when not ``enabled``, or (after one warning line) when tensorboard is not installed.
    """
    if not enabled:
        return Off()
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        warn(f"warning: tensorboard is not installed, so this run writes no TensorBoard log: {INSTALL}")
        return Off()
    written = _event_file_seconds(folder)
    if written:
        # Readers take a folder's event files in name order, and a name starts with the second its file was
        # opened: the file that purges must come after those it purges (a restart within the same second, or
        # on another host, waits for the next second; a clock behind by more than that is not waited for).
        deadline = time.time() + 2
        while int(time.time()) <= max(written) and time.time() < deadline:
            time.sleep(0.05)
    return Board(SummaryWriter(str(folder), purge_step=purge_from if written else None))


def _event_file_seconds(folder):
    """The seconds in the names of the event files in ``folder`` (events.out.tfevents.<seconds>.<host>...)."""
    if not folder.is_dir():
        return []
    return [int(m.group(1)) for p in folder.iterdir() if (m := re.match(r"events\.out\.tfevents\.(\d+)\.", p.name))]
