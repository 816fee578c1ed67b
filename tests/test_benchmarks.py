"""The benchmarks' timer of the training loop's own step (benchmarks/run_step.py) on the CPU: it runs, and reports."""
import sys
from pathlib import Path

import pytest

from tests.conftest import tiny_gin

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
KEYS = {"batch", "device", "threads", "steps", "repeats", "ms_per_step", "samples_per_s", "ms_per_step_blocks",
        "cpu_ms_per_step", "cpu_passes_ms", "cpu_overhead_ms", "cpu_overhead_fraction",
        "network_calls", "passes_ms", "passes_ms_blocks", "overhead_ms", "overhead_fraction", "overhead_ms_blocks",
        "step_over_passes", "gflop_per_sample", "tflop_per_s", "peak_GiB", "parameters", "samples_trained"}


@pytest.fixture
def run_step(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # the scripts import each other as `import run_step`
    sys.modules.pop("run_step", None)
    import run_step
    return run_step


def test_run_step_timer_times_two_steps_of_a_tiny_tract_run(run_step):
    """Two timed steps (and two replays of their network passes) of a tiny digits TRACT Run built from gin."""
    text = tiny_gin("train.method = @TRACT()\nTRACT.schedule = (64, 8, 1)\ninference_ema_momentum.momentum = 0.9",
                    extra="train.device = @Device()\nDevice.name = 'cpu'")
    with run_step.built_run(text=text) as run:
        row = run_step.time_run_step(run, steps=2, repeats=1, warmup=1)
        workdir = run.o.workdir
        # what the benchmark turned off left nothing behind; the metrics records are the loop's own
        assert not (workdir / "checkpoints").exists() and not (workdir / "tensorboard").exists()
        assert not list(workdir.glob("**/*.png"))
    assert KEYS <= set(row)
    assert row["batch"] == 16 and row["steps"] == 2 and row["samples_trained"] == 3 * 16  # 1 warm-up + 2 timed
    assert row["network_calls"] == "teacher fwd ×1, self_teacher fwd ×1, student fwd+bwd ×1"
    assert row["ms_per_step"] > 0 and row["passes_ms"] > 0 and row["gflop_per_sample"] > 0
    assert row["overhead_ms"] == pytest.approx(row["ms_per_step"] - row["passes_ms"])  # one block: its own difference


def test_a_case_runs_from_its_run_file(run_step):
    """A case of the benchmark (gin/digits_teacher.gin), at a small batch: it names the run file and what it changed."""
    row = run_step.measure_case("digits_teacher", batch=8, threads=1, device="cpu", steps=1, repeats=1, warmup=1)
    assert row["case"] == "digits_teacher" and row["run_file"] == "gin/digits_teacher.gin"
    assert row["network_calls"] == "student fwd+bwd ×1" and row["parameters"] == 208369
    assert "train.tensorboard = False" in row["changed"] and KEYS <= set(row)


def test_the_latent_benchmark_counts_a_stable_diffusion_1_5_unet(monkeypatch):
    """benchmarks/latent_unet.py builds SD 1.5's UNet (859,520,964 parameters) behind the adapter and counts its
    FLOPs on the meta device: the update (forward + backward) costs between 2 and 3.5 forward passes."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    sys.modules.pop("latent_unet", None)
    import latent_unet

    forward, update, params = latent_unet.flops_per_sample()
    assert params == 859_520_964
    assert 700e9 < forward < 900e9 and 2.0 * forward < update < 3.5 * forward
