"""A run killed with SIGKILL and started again ends with bit-identical weights (CPU)."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import bitwise_equal, tiny_gin
from tract_repro.training import checkpoint as ckpt

ROOT = Path(__file__).resolve().parents[1]
TEACHER = tiny_gin("train.method = @TeacherTraining()\nTeacherTraining.sample_steps = 8\n"
                   "inference_ema_momentum.momentum = 0.9", total=256)


def launch(gin_file, workdir):
    cmd = [sys.executable, "-m", "tract_repro.launch", str(gin_file), "--workdir", str(workdir)]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc):
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]


def kill_after_checkpoint(gin_file, workdir, min_samples):
    """Start a run, SIGKILL it as soon as a checkpoint past ``min_samples`` exists, return that count."""
    proc = launch(gin_file, workdir)
    deadline = time.time() + 300
    while time.time() < deadline:
        found = ckpt.list_checkpoints(Path(workdir) / "checkpoints")
        if found and int(found[-1].stem.split("_")[1]) >= min_samples:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            return int(found[-1].stem.split("_")[1])
        if proc.poll() is not None:
            pytest.fail(f"run ended before it could be killed: {proc.stderr.read()[-2000:]}")
        time.sleep(0.005)
    proc.kill()
    pytest.fail("no checkpoint appeared")


@pytest.mark.parametrize("method", ["tract", "teacher"])
def test_sigkill_and_resume_equals_an_uninterrupted_run(tmp_path, method):
    teacher_gin = tmp_path / "teacher.gin"
    teacher_gin.write_text(TEACHER)
    if method == "teacher":
        text = TEACHER.replace("train.total = 256", "train.total = 2560") + "\nUNet.dropout = 0.1\n"
    else:
        finish(launch(teacher_gin, tmp_path / "teacher"))
        text = tiny_gin(f"train.method = @TRACT()\nTRACT.schedule = (64, 8, 1)\ntrain.teacher = '{tmp_path / 'teacher'}'\n"
                        "inference_ema_momentum.residual = 1e-3\nUNet.dropout = 0.1", total=2560)
    text += "\ntrain.checkpoint_every = 160\n"
    gin_file = tmp_path / "run.gin"
    gin_file.write_text(text)

    finish(launch(gin_file, tmp_path / "straight"))
    killed_at = kill_after_checkpoint(gin_file, tmp_path / "resumed", min_samples=480)
    assert killed_at < 2560 and not (tmp_path / "resumed" / "ema.pt").exists()
    finish(launch(gin_file, tmp_path / "resumed"))

    a = ckpt.load(ckpt.list_checkpoints(tmp_path / "straight" / "checkpoints")[-1])
    b = ckpt.load(ckpt.list_checkpoints(tmp_path / "resumed" / "checkpoints")[-1])
    assert a["samples"] == b["samples"] == 2560

    for key in a:
        assert bitwise_equal(a[key], b[key]), f"{key} differs after resume"
    ema_a = torch.load(tmp_path / "straight" / "ema.pt", weights_only=True)
    ema_b = torch.load(tmp_path / "resumed" / "ema.pt", weights_only=True)
    assert all(torch.equal(ema_a[k], ema_b[k]) for k in ema_a)
    lines_a = [l.split('"samples_per_s"')[0] for l in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    lines_b = [l.split('"samples_per_s"')[0] for l in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert lines_a == lines_b  # the metrics log was rewound to the checkpoint, not duplicated
