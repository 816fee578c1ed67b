"""Metrics: Fréchet distance identities, per-seed sampling, the classifier gate, offline Inception, evaluate."""
import json
import shutil
from pathlib import Path
import time

import numpy as np
import pytest
import torch

from tests.conftest import tiny_gin
from tract_repro import launch
from tract_repro.evaluation.metrics import evaluate_run
from tract_repro.evaluate import main as evaluate_main
from tract_repro.evaluation import frechet
from tract_repro.evaluation.classifier import train_classifier
from tract_repro.evaluation.generate import generate, teacher_reference
from tract_repro.evaluation.inception import MissingWeights, inception_extractor
from tract_repro.evaluation.runs import load_run


def gaussian_features(n=4000, d=8, seed=0):
    g = np.random.default_rng(seed)
    return g.normal(size=(n, d)) @ g.normal(size=(d, d))


def test_frechet_distance_of_a_set_with_itself_is_zero():
    stats = frechet.statistics(gaussian_features())
    assert abs(frechet.frechet_distance(stats, stats)) < 1e-6


def test_shifting_features_moves_the_distance_by_the_squared_shift():
    feats = gaussian_features()
    shift = np.arange(8) * 0.25
    fd = frechet.frechet_distance(frechet.statistics(feats), frechet.statistics(feats + shift))
    assert fd == pytest.approx(float(shift @ shift), rel=1e-6)


def test_frechet_distance_of_gaussians_matches_the_closed_form():
    """Diagonal covariances: FD = ‖μ₁−μ₂‖² + Σ(√a − √b)²."""
    mu1, mu2 = np.zeros(3), np.array([1.0, 0.0, -2.0])
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 9.0])
    fd = frechet.frechet_distance((mu1, np.diag(a)), (mu2, np.diag(b)))
    assert fd == pytest.approx(5.0 + float(((np.sqrt(a) - np.sqrt(b)) ** 2).sum()), rel=1e-9)


class Blur(torch.nn.Module):
    """A deterministic stand-in denoiser: D(x, λ) = tanh(x)·sigmoid(λ)."""

    conditional = False

    def forward(self, x, logsnr, labels=None):
        return torch.tanh(x) * torch.sigmoid(logsnr).view(-1, 1, 1, 1)


def test_samples_depend_on_their_seed_only_not_on_batching():
    """Each seed's noise is bit-identical whatever the batch; outputs agree to float64 round-off (vectorised
    kernels may round a batch's tail differently, so bitwise equality across batch sizes is not promised)."""
    from tract_repro.diffusion.grid import TimeGrid
    from tract_repro.diffusion.schedules import CosineSchedule
    from tract_repro.sampling.samplers import noise_from_seeds

    assert torch.equal(noise_from_seeds(range(10, 20), (1, 8, 8))[5:], noise_from_seeds(range(15, 20), (1, 8, 8)))
    grid = TimeGrid(CosineSchedule(), 64)
    a = generate(Blur(), grid, 4, range(10, 20), (1, 8, 8), batch_size=3)
    b = generate(Blur(), grid, 4, range(10, 20), (1, 8, 8), batch_size=10)
    c = generate(Blur(), grid, 4, range(15, 20), (1, 8, 8), batch_size=2)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    torch.testing.assert_close(a[5:], c, rtol=0, atol=1e-12)
    assert not torch.allclose(a[0], a[1])


def test_forked_sampling_workers_give_the_same_samples_in_seed_order():
    """generate(..., workers=k): contiguous shares of the seeds sampled in forked one-thread processes."""
    from tract_repro.diffusion.grid import TimeGrid
    from tract_repro.diffusion.schedules import CosineSchedule

    grid = TimeGrid(CosineSchedule(), 64)
    alone = generate(Blur(), grid, 4, range(10, 21), (1, 8, 8), batch_size=4)
    for workers in (2, 3, 20):  # 11 seeds: shares of 5-6, 3-4, and one seed each (no empty worker)
        torch.testing.assert_close(generate(Blur(), grid, 4, range(10, 21), (1, 8, 8), batch_size=4, workers=workers),
                                   alone, rtol=0, atol=1e-12)

    class Failing(Blur):
        def forward(self, *a):
            raise ValueError("bad denoiser")

    with pytest.raises(ValueError, match="bad denoiser"):  # raised here as the worker raised it
        generate(Failing(), grid, 4, range(4), (1, 8, 8), workers=2)


def test_teacher_reference_is_cached_by_weights(tmp_path):
    from tract_repro.diffusion.grid import TimeGrid
    from tract_repro.diffusion.schedules import CosineSchedule

    grid = TimeGrid(CosineSchedule(), 64)
    weights = tmp_path / "w.pt"
    weights.write_bytes(b"teacher-1")
    first = teacher_reference(Blur(), weights, grid, 8, range(6), (1, 8, 8), tmp_path / "cache")
    assert len(list((tmp_path / "cache").glob("reference_*.pt"))) == 1

    class Exploding(Blur):
        def forward(self, *a):
            raise AssertionError("the cache was not used")

    again = teacher_reference(Exploding(), weights, grid, 8, range(6), (1, 8, 8), tmp_path / "cache")
    assert torch.equal(first, again)
    weights.write_bytes(b"teacher-2")  # new weights → a new reference
    teacher_reference(Blur(), weights, grid, 8, range(6), (1, 8, 8), tmp_path / "cache")
    assert len(list((tmp_path / "cache").glob("reference_*.pt"))) == 2


def test_classifier_accuracy_gate(tmp_path):
    with pytest.raises(ValueError, match="held-out accuracy") as info:
        train_classifier(tmp_path / "weak", epochs=1, lr=1e-5, min_accuracy=0.95)
    assert "train longer" in str(info.value).splitlines()[0]  # the CLI prints this first line only
    assert not (tmp_path / "weak" / "classifier.pt").exists()


def test_missing_inception_weights_fail_fast_in_one_line(tmp_path):
    for protocol in ("tract", "clean", "edm"):
        start = time.perf_counter()
        with pytest.raises(MissingWeights) as info:
            inception_extractor(protocol=protocol, path=str(tmp_path / "nowhere" / "inception.pt") if protocol != "tract"
                                else str(tmp_path / "none.pth"))
        assert time.perf_counter() - start < 2
        message = str(info.value).splitlines()[0]  # gin may append call context on later lines
        assert "fetch https://" in message and "put it" in message and f"protocol {protocol}" in message


@pytest.mark.filterwarnings("ignore::FutureWarning")  # clean-fid's Inception is TorchScript
def test_torchscript_inception_path_is_used_when_present(tmp_path):
    """A TorchScript module of clean-fid's interface at the configured path is loaded, never downloaded."""
    class Stub(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.Identity()

        def forward(self, x: torch.Tensor, return_features: bool = True) -> torch.Tensor:
            return x.flatten(1)[:, :2048]

    torch.jit.script(Stub()).save(str(tmp_path / "inception-2015-12-05.pt"))
    extractor = inception_extractor(protocol="edm", path=str(tmp_path))
    feats = extractor(torch.rand(2, 3, 32, 32) * 255)
    assert feats.shape == (2, 2048)


def test_evaluate_a_tiny_run_end_to_end(tmp_path, capsys):
    text = tiny_gin("train.method = @TeacherTraining()\nTeacherTraining.sample_steps = 8\n"
                    "inference_ema_momentum.momentum = 0.9", total=256)
    (tmp_path / "t.gin").write_text(text)
    assert launch.main([str(tmp_path / "t.gin"), "--workdir", str(tmp_path / "teacher")]) == 0
    train_classifier(tmp_path / "clf", epochs=3, min_accuracy=0.5)
    args = [str(tmp_path / "teacher"), "--steps", "1", "4", "--samples", "64", "--classifier", str(tmp_path / "clf"),
            "--reference-steps", "8", "--cache", str(tmp_path / "cache")]
    assert evaluate_main(args) == 0
    metrics = json.loads((tmp_path / "teacher" / "eval" / "metrics.json").read_text())
    assert [r["steps"] for r in metrics["results"]] == [1, 4] and metrics["seeds"] == [0, 63]
    assert all(r["digits_fd"] > 0 and r["fidelity_rmse"] > 0 for r in metrics["results"])
    assert (tmp_path / "teacher" / "eval" / "samples_1steps.png").is_file()
    # the teacher's 8-step samples are its own reference: zero fidelity error
    again = evaluate_run(tmp_path / "teacher", steps=(8,), samples=64, classifier=tmp_path / "clf", reference_steps=8,
                         cache=tmp_path / "cache", out=tmp_path / "m8.json")
    assert again["results"][0]["fidelity_rmse"] == 0.0
    assert load_run(tmp_path / "teacher").denoiser.parameterisation == "v"
    # several runs in one process (a row's seeds): each file as if evaluated alone
    shutil.copytree(tmp_path / "teacher", tmp_path / "copy")
    outs = [str(tmp_path / "both" / "a.json"), str(tmp_path / "both" / "b.json")]
    assert evaluate_main([str(tmp_path / "teacher"), str(tmp_path / "copy"), *args[1:], "--out", *outs]) == 0
    for out in outs:
        assert json.loads(Path(out).read_text())["results"] == metrics["results"]
        assert Path(out.replace(".json", "_4steps.png")).is_file()
    capsys.readouterr()
    assert evaluate_main([str(tmp_path / "teacher"), str(tmp_path / "copy"), *args[1:], "--out", outs[0]]) == 2
    assert "give one --out per run" in capsys.readouterr().err


def test_evaluate_unfinished_run_is_one_line(tmp_path, capsys):
    assert evaluate_main([str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "is not a run directory" in err
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.gin").write_text("train.total = 1\n")
    assert evaluate_main([str(tmp_path / "half")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"error: {tmp_path / 'half'} is not a finished run (no ema.pt): finish it with "
                   f"`python -m tract_repro.launch {tmp_path / 'half' / 'config.gin'} --workdir {tmp_path / 'half'}`, "
                   f"then evaluate it")


def test_teacher_reference_steps_divide_the_teachers_grid():
    from tract_repro.evaluation.metrics import reference_steps_on

    assert reference_steps_on(1024, 64) == 64
    assert reference_steps_on(40, 64) == 40  # an EDM grid: every step
    assert reference_steps_on(32, 64) == 32 and reference_steps_on(48, 20) == 16 and reference_steps_on(7, 3) == 1
