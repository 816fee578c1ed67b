"""TensorBoard logs of training: the metrics.jsonl records and the sample grids, read back with TensorBoard's
own reader; the switch; a resumed run's log equal to an uninterrupted one's; a run without tensorboard."""
import io
import itertools
import json
import shutil
import sys

import gin
import numpy as np
import pytest
import torch
from PIL import Image
pytest.importorskip("tensorboard", reason="tensorboard is an optional extra: pip install 'tract-repro[tensorboard]'")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402
from tensorboard.summary.writer import event_file_writer  # noqa: E402
from torch.utils.tensorboard import SummaryWriter

from tests.conftest import bitwise_equal, random_teacher, tiny_gin
from tract_repro import config
from tract_repro.data.arrays import ImageArrays
from tract_repro.training import checkpoint as ckpt
from tract_repro.training import preemption
from tract_repro.training.loop import train
from tract_repro.training.run_files import RunDirectory
from tract_repro.training.tensorboard import open_board

# TRACT 64 → 8 → 1: two phases of 256 samples (16 steps of 16), a record every 64 samples, a checkpoint every 128,
# a grid every 128 (the phase end's at 256, the final one at 512), dropout so that a resume must restore RNG states.
RUN = tiny_gin("train.method = @TRACT()\nTRACT.schedule = (64, 8, 1)\ntrain.teacher = 'TEACHER'\n"
               "inference_ema_momentum.residual = 1e-3\nUNet.dropout = 0.1", total=512,
               extra="train.checkpoint_every = 128\ntrain.grid_every = 128\ntrain.keep_checkpoints = 8")
GRIDS = {"samples/8_steps": [128, 256], "samples/1_steps": [384, 512]}


class Crash(Exception):
    """A failure in the middle of training."""


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return random_teacher(tmp_path_factory)


def run(workdir, teacher, extra=""):
    config.parse([], [], text=RUN.replace("'TEACHER'", repr(str(teacher))) + "\n" + extra)
    return train(workdir)


@pytest.fixture(scope="module")
def straight(tmp_path_factory, teacher):
    """The uninterrupted run."""
    gin.clear_config()
    try:
        return run(tmp_path_factory.mktemp("straight") / "run", teacher)
    finally:
        gin.clear_config()


def log(run_dir):
    """The run's TensorBoard log as TensorBoard reads it (orphaned events purged), every event kept."""
    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def scalars(acc, skip=()):
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"] if tag not in skip}


def images(acc):
    return {tag: [(e.step, np.asarray(Image.open(io.BytesIO(e.encoded_image_string)))) for e in acc.Images(tag)]
            for tag in acc.Tags()["images"]}


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def at_batch(monkeypatch, n, action):
    """Do ``action()`` when training asks for its n-th batch, i.e. once step n − 1 and all that follows it
    (record, grid, checkpoint) are done; an event in the run, not a clock."""
    original, calls = ImageArrays.batch, itertools.count(1)

    def batch(self, idx, generator=None):
        if next(calls) == n:
            action()
        return original(self, idx, generator)

    monkeypatch.setattr(ImageArrays, "batch", batch)


def lazy_event_writer(monkeypatch):
    """TensorBoard's event writer at its laziest: its background thread may write an event at any time after
    it is added, and it is on disk once flush() or close() returns; here it is written then and no sooner."""
    writer, pending = event_file_writer._AsyncWriter, {}
    write = writer.write

    def written_first(method):
        def call(self):
            for data in pending.pop(self, []):
                write(self, data)
            return method(self)
        return call

    monkeypatch.setattr(writer, "write", lambda self, data: pending.setdefault(self, []).append(data))
    for name in ("flush", "close"):
        monkeypatch.setattr(writer, name, written_first(getattr(writer, name)))


# ------------------------------------------------------------------------------------------------- what is logged

def test_every_record_of_metrics_jsonl_is_logged_at_its_sample_count(straight):
    recs = records(straight)
    assert [r["samples"] for r in recs] == list(range(64, 513, 64))
    logged = scalars(log(straight))
    keys = set(recs[0]) - {"samples"}
    assert keys == {"phase", "student_steps", "lr", "loss", "grad_norm", "samples_per_s"}
    assert set(logged) == {f"train/{k}" for k in keys}
    for key in keys:  # the same numbers at the same sample counts, to float32 (TensorBoard's scalar type)
        assert logged[f"train/{key}"] == [(r["samples"], float(np.float32(r[key]))) for r in recs], key
    assert [v for _, v in logged["train/student_steps"]] == [8] * 4 + [1] * 4


def test_the_sample_grids_are_logged_as_their_pngs_show_them(straight):
    grids = images(log(straight))
    assert {tag: [step for step, _ in entries] for tag, entries in grids.items()} == GRIDS
    pngs = {(steps, samples): straight / "samples" / f"grid_{samples:012d}_{steps}steps.png"
            for steps, at in ((8, [128, 256]), (1, [384, 512])) for samples in at}
    for (steps, samples), png in pngs.items():
        pixels = dict(grids[f"samples/{steps}_steps"])[samples]
        assert np.array_equal(pixels[:, :, 0], np.asarray(Image.open(png))), png.name  # grey in TensorBoard's RGB
        assert np.array_equal(pixels[:, :, 0], pixels[:, :, 2])
    final = dict(grids["samples/1_steps"])[512]  # the final grid is the one at the last step, logged once
    assert np.array_equal(final[:, :, 0], np.asarray(Image.open(straight / "samples" / "final_1steps.png")))


def test_train_tensorboard_false_writes_no_log_and_the_log_changes_no_number(tmp_path, teacher, straight):
    run(tmp_path / "run", teacher, "train.tensorboard = False")
    assert not (tmp_path / "run" / "tensorboard").exists()
    assert "train.tensorboard = False" in (tmp_path / "run" / "operative_config.gin").read_text()
    strip = lambda r: {k: v for k, v in r.items() if k != "samples_per_s"}  # noqa: E731
    assert [strip(r) for r in records(tmp_path / "run")] == [strip(r) for r in records(straight)]
    assert bitwise_equal(torch.load(tmp_path / "run" / "ema.pt", weights_only=True),
                         torch.load(straight / "ema.pt", weights_only=True))
    for png in (straight / "samples").iterdir():
        assert (tmp_path / "run" / "samples" / png.name).read_bytes() == png.read_bytes(), png.name


def test_without_tensorboard_installed_a_run_warns_once_and_trains(tmp_path, teacher, monkeypatch, capsys):
    for name in [m for m in sys.modules if m == "tensorboard" or m.startswith(("tensorboard.", "torch.utils.tensorboard"))]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # `import tensorboard` raises ImportError
    with pytest.raises(ImportError):
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    run(tmp_path / "run", teacher, "train.total = 256")
    warnings = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning:")]
    assert warnings == ["warning: tensorboard is not installed, so this run writes no TensorBoard log: "
                        "pip install tensorboard (or set train.tensorboard = False)"]
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["status"] == "complete" and (tmp_path / "run" / "ema.pt").is_file()
    assert len(records(tmp_path / "run")) == 4 and not (tmp_path / "run" / "tensorboard").exists()


# ------------------------------------------------------------------------------------------------------- resume

def snapshot(source, target):
    """What a SIGKILL at this moment would leave: the folder as it is on disk."""
    return lambda: shutil.copytree(source, target)


def crash():
    raise Crash("killed")


@pytest.mark.parametrize("how", ["sigkill", "crash", "stop", "stop between records", "crash before the first checkpoint",
                                 "crash after the final checkpoint"])
def test_an_interrupted_and_resumed_run_logs_what_an_uninterrupted_one_does(tmp_path, teacher, straight, monkeypatch,
                                                                          how):
    """Interrupted when it asks for its 23rd batch (352 samples trained: checkpoints at 128 and 256, records to 320),
    or its 6th (80 samples, a record at 64, no checkpoint), or stopped on request at 384, or killed after its final
    checkpoint, the resumed run's log is the uninterrupted run's: the same steps, each once, the same values
    (samples/s aside: a clock's), the same pictures."""
    workdir, interrupted = tmp_path / "run", tmp_path / "run"
    lazy_event_writer(monkeypatch)
    if how == "sigkill":
        interrupted = tmp_path / "killed"
        at_batch(monkeypatch, 23, snapshot(workdir, interrupted))
        run(workdir, teacher)  # trains on to the end; the copy is what the kill left
    elif how == "crash after the final checkpoint":
        def finish(self, weights, info):
            raise Crash("killed before ema.pt")
        monkeypatch.setattr(RunDirectory, "finish", finish)
        with pytest.raises(Crash):
            run(workdir, teacher)
    else:
        stop = how.startswith("stop")  # between records, the checkpoint keeps the interval's sums so far
        at_batch(monkeypatch, {"crash": 23, "crash before the first checkpoint": 6, "stop": 24, "stop between records": 23}[how],
                 preemption.request_stop if stop else crash)
        with pytest.raises(preemption.Stopped if stop else Crash):
            run(workdir, teacher)
    monkeypatch.undo()

    found = ckpt.list_checkpoints(interrupted / "checkpoints")
    resumed_at = int(found[-1].stem.split("_")[1]) if found else 0
    before = scalars(log(interrupted))["train/loss"]
    assert resumed_at == {"crash before the first checkpoint": 0, "stop": 384, "stop between records": 368,
                          "crash after the final checkpoint": 512}.get(how, 256)
    if how in ("crash", "crash before the first checkpoint", "crash after the final checkpoint"):
        # the log, closed on the way out, holds what came after the checkpoint: the resume must purge it
        assert before[-1][0] == {"crash": 320, "crash before the first checkpoint": 64}.get(how, 512)
    if how == "crash after the final checkpoint":  # the final grid too, which the resumed run draws again
        assert [s for s, _ in images(log(interrupted))["samples/1_steps"]] == [384, 512]
    if how == "sigkill":  # flushed with each checkpoint: everything up to the last one outlived the kill
        assert [s for s, _ in before if s <= 256] == [64, 128, 192, 256]
    assert not (interrupted / "ema.pt").exists()

    run(interrupted, teacher)
    skip = {"train/samples_per_s"}  # wall-clock rates: those the resumed run measured itself
    mine, theirs = log(interrupted), log(straight)
    assert scalars(mine, skip) == scalars(theirs, skip)
    a, b = images(mine), images(theirs)
    assert a.keys() == b.keys() == GRIDS.keys()
    for tag in a:
        assert [s for s, _ in a[tag]] == [s for s, _ in b[tag]] == GRIDS[tag]
        assert all(np.array_equal(x, y) for (_, x), (_, y) in zip(a[tag], b[tag])), tag
    strip = lambda r: {k: v for k, v in r.items() if k != "samples_per_s"}  # noqa: E731
    assert [strip(r) for r in records(interrupted)] == [strip(r) for r in records(straight)]
    # its samples/s are those metrics.jsonl kept: the killed run's up to the checkpoint, then the resumed run's
    assert scalars(mine)["train/samples_per_s"] == [(r["samples"], float(np.float32(r["samples_per_s"])))
                                                    for r in records(interrupted)]


def test_a_restart_within_the_same_second_on_another_host_still_purges(tmp_path):
    """Event files are read in name order, and a name is events.out.tfevents.<second>.<host>.<pid>...: the
    file of a run restarted within the second its killed predecessor opened its file must still come after it."""
    folder = tmp_path / "tensorboard"
    killed = SummaryWriter(str(folder))
    for step in (1, 2, 3):
        killed.add_scalar("train/loss", 10.0 * step, step)
    killed.close()
    (old,) = folder.iterdir()
    second = int(old.name.split(".")[3])
    old.rename(folder / f"events.out.tfevents.{second:010d}.zzzz-another-host.1.0")  # sorts after this host's
    board = open_board(folder, purge_from=3)  # resumed from a checkpoint at 2
    board.scalars(dict(samples=3, loss=3.5))
    board.close()
    assert scalars(EventAccumulator(str(folder)).Reload()) == {"train/loss": [(1, 10.0), (2, 20.0), (3, 3.5)]}
