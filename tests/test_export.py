"""python -m tract_repro.export: safetensors and diffusers exports of tiny finished runs, and their round trips.

A round trip is exact: the exported weights are the run's bit for bit, and K-step samples from the same noise
(through ``load_exported`` and our sampler, or through diffusers' ``DiffusionPipeline.from_pretrained`` and the
shipped pipeline) are ``torch.equal`` to ours, tolerance 0.  Bad inputs are one line, exit status 2, nothing written.
"""
import json
import shutil
import sys

import pytest
import torch

from tests.conftest import tiny_gin
from tests.test_edm_runs import EDM_BASE
from tract_repro import launch
from tract_repro.common.files import sha256
from tract_repro.evaluation.generate import labels_from_seeds
from tract_repro.evaluation.metrics import conditioned
from tract_repro.evaluation.runs import load_run
from tract_repro.export import main
from tract_repro.networks.conditioning import Cond
from tract_repro.sampling import registry
from tract_repro.sampling.samplers import noise_from_seeds

EXTRA = "an optional extra: pip install 'tract-repro[export]'"
SEEDS = range(6)
TEACHER = tiny_gin("train.method = @TeacherTraining()\nTeacherTraining.sample_steps = 8\n"
                   "inference_ema_momentum.momentum = 0.9", total=64)
GUIDED = tiny_gin("train.method = @TeacherTraining()\nTeacherTraining.sample_steps = 8\nTeacherTraining.p_uncond = 0.2\n"
                  "inference_ema_momentum.momentum = 0.9\nUNet.num_classes = 10\nUNet.null_class = True", total=64)
EDM = EDM_BASE + ("train.T = 40\ntrain.total = 32\ntrain.method = @TeacherTraining()\nTeacherTraining.weighting = 'edm'\n"
                  "TeacherTraining.time_distribution = 'lognormal'\nTeacherTraining.sample_steps = 8\n"
                  "inference_ema_momentum.momentum = 0.9\n")


def tract(teacher):
    return tiny_gin(f"train.method = @TRACT()\nTRACT.schedule = (64, 8, 1)\ntrain.teacher = '{teacher}'\n"
                    "inference_ema_momentum.residual = 1e-3", total=64)


def stage_1(teacher):
    return tiny_gin(f"train.method = @GuidedDistillation()\ntrain.teacher = '{teacher}'\nTeacherTraining.sample_steps = 8\n"
                    "inference_ema_momentum.momentum = 0.9\nUNet.num_classes = 10\nUNet.null_class = True\n"
                    "UNet.extra_conditions = ('w',)", total=64)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Finished tiny runs: a teacher, its TRACT student (64 → 8 → 1), a guided class-conditional teacher, its
    w-conditioned stage-1 student, an EDM (VE) teacher; and an unfinished one."""
    ws = tmp_path_factory.mktemp("runs")
    files = {"teacher": TEACHER, "tract": tract(ws / "teacher"), "guided": GUIDED, "stage1": stage_1(ws / "guided"),
             "edm": EDM}
    for name, text in files.items():
        (ws / f"{name}.gin").write_text(text)
        assert launch.main([str(ws / f"{name}.gin"), "--workdir", str(ws / name)]) == 0, name
    shutil.copytree(ws / "teacher", ws / "half")
    (ws / "half" / "ema.pt").unlink()
    return ws


def listing(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def ours(run, steps, w=None, sampler="ddim"):
    """Our K-step samples in [−1, 1] from the noise (and class labels) of SEEDS, as evaluation draws them."""
    denoiser, extra, _ = conditioned(run, w)
    labels = labels_from_seeds(SEEDS, 10) if run.denoiser.conditional else None
    cond = Cond(labels, {k: torch.full((len(SEEDS),), float(v), dtype=torch.float64) for k, v in (extra or {}).items()})
    noise = noise_from_seeds(SEEDS, (1, 8, 8))
    return registry.sample(sampler, denoiser, run.grid, steps, noise, cond, seeds=SEEDS).clamp(-1, 1)


# ------------------------------------------------------------------------------------------ safetensors

def test_safetensors_export_round_trips_exactly(runs, tmp_path, monkeypatch, capsys):
    pytest.importorskip("safetensors", reason=f"safetensors is {EXTRA}")
    from safetensors import safe_open

    from tract_repro.exporting import load_exported

    out = tmp_path / "export"
    assert main([str(runs / "tract"), "--out", str(out)]) == 0
    assert "not evaluated" in capsys.readouterr().out
    assert sorted(listing(out)) == ["README.md", "config.gin", "model.safetensors", "run.json"]
    assert (out / "config.gin").read_bytes() == (runs / "tract" / "config.gin").read_bytes()
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        meta = f.metadata()
    assert meta["method"] == "TRACT" and json.loads(meta["schedule_steps"]) == [64, 8, 1] and meta["T"] == "64"
    assert meta["parameterisation"] == "v" and meta["noise_schedule"] == "CosineSchedule"
    assert meta["ema_sha256"] == sha256(runs / "tract" / "ema.pt")
    assert meta["teacher_sha256"] == sha256(runs / "teacher" / "ema.pt")
    run = load_run(runs / "tract", with_data=False)
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("load_exported unpickled something"))
    exported = load_exported(out)
    monkeypatch.undo()
    mine, theirs = run.denoiser.state_dict(), exported.denoiser.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert exported.info == run.info and exported.grid.T == 64
    for k in (1, 8, 64):  # the student's step count, its previous phase's, the teacher's grid
        assert torch.equal(ours(exported, k), ours(run, k)), k
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: tract-repro\ntags:\n") and "- diffusion-distillation\n- tract\n" in card
    for fact in ("64 → 8 → 1", "K = 1 DDIM steps", f"`{runs / 'teacher' / 'ema.pt'}`", sha256(runs / "teacher" / "ema.pt"),
                 "64 training samples", "Not evaluated", sha256(out / "model.safetensors")):
        assert fact in card, fact


def test_an_edm_run_exports_as_safetensors_and_samples_the_same(runs, tmp_path):
    pytest.importorskip("safetensors", reason=f"safetensors is {EXTRA}")
    from tract_repro.exporting import load_exported

    assert main([str(runs / "edm"), "--out", str(tmp_path / "edm")]) == 0
    run, exported = load_run(runs / "edm", with_data=False), load_exported(tmp_path / "edm")
    for sampler, k in (("heun", 4), ("ddim", 8)):
        assert torch.equal(ours(exported, k, sampler=sampler), ours(run, k, sampler=sampler)), sampler


def evaluation_file(path, weights, **row):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dict(run="somewhere", method="TRACT", weights_sha256=weights, sampler="ddim (clipped x̂)",
                                    samples=500, seeds=[0, 499],
                                    digits_fd_noise_floor=2.9, results=[dict(steps=1, nfe=1, **row)])))
    return path


def test_the_card_reports_evaluations_of_these_weights_only(runs, tmp_path, monkeypatch, capsys):
    pytest.importorskip("safetensors", reason=f"safetensors is {EXTRA}")
    run = tmp_path / "run"
    shutil.copytree(runs / "tract", run)
    weights = sha256(run / "ema.pt")
    evaluation_file(run / "eval" / "metrics.json", weights, digits_fd=12.3456, fidelity_rmse=0.125)
    evaluation_file(run / "eval" / "old.json", "0" * 64, digits_fd=99.0)  # other weights: left out
    monkeypatch.chdir(tmp_path)  # the digits pipeline's evaluations are found under ./results
    evaluation_file(tmp_path / "results" / "digits" / "eval" / "row" / "s0.json", weights, digits_fd=7.5)
    fid = tmp_path / "fid.json"
    fid.write_text(json.dumps(dict(weights_sha256=weights, sampler="ddim (clipped x̂)", protocol=dict(
        description="clean-fid clean: TorchScript TF-Inception, PIL bicubic resize to 299", samples_per_range=50000,
        seed_ranges=[[0, 49999], [50000, 99999], [100000, 149999]], headline="mean over seed ranges"),
        results=[dict(steps=2, nfe=2, fid_mean=3.25, fid_std=0.05, fid_headline=3.25)])))
    assert main([str(run), "--out", "export", "--metrics", str(fid)]) == 0
    card = (tmp_path / "export" / "README.md").read_text()
    assert ("| 1 | 1 |  | ddim (clipped x̂) | digits-FD | 12.35 (teacher fidelity RMSE 0.125) | digits-FD, classifier "
            "features; 500 samples, seeds 0..499; noise floor 2.900 | ") in card
    assert "| digits-FD | 7.5 |" in card and "| digits-FD | 99 |" not in card and "old.json" not in card
    assert ("| 2 | 2 |  | ddim (clipped x̂) | FID | 3.25 (mean 3.25 ± 0.05) | clean-fid clean: TorchScript TF-Inception, PIL bicubic resize "
            "to 299; 3 seed ranges × 50000 samples; mean over seed ranges |") in card
    assert "Not evaluated" not in card
    capsys.readouterr()
    other = evaluation_file(tmp_path / "other.json", "f" * 64, digits_fd=1.0)
    assert main([str(run), "--out", "again", "--metrics", str(other)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "evaluates other weights" in err and not (tmp_path / "again").exists()


# -------------------------------------------------------------------------------------------- diffusers

@pytest.fixture
def from_pretrained(monkeypatch, tmp_path):
    """diffusers' own loader, as a user calls it on the exported folder, offline; the code it copies out of the folder
    goes to a module cache under tmp_path instead of ~/.cache."""
    diffusers = pytest.importorskip("diffusers", reason=f"diffusers is {EXTRA}")
    from diffusers.utils import dynamic_modules_utils

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(dynamic_modules_utils, "HF_MODULES_CACHE", str(tmp_path / "hf_modules"))
    monkeypatch.setattr(sys, "path", list(sys.path))

    def load(folder):
        pipe = diffusers.DiffusionPipeline.from_pretrained(str(folder), trust_remote_code=True)
        pipe.set_progress_bar_config(disable=True)
        return pipe
    return load


def images(x):
    return (x / 2 + 0.5).clamp(0, 1)


def test_diffusers_export_samples_what_we_sample(runs, tmp_path, from_pretrained):
    from tract_repro.exporting import load_exported

    out = tmp_path / "pipe"
    assert main([str(runs / "tract"), "--format", "diffusers", "--out", str(out)]) == 0
    assert sorted(listing(out)) == ["README.md", "config.gin", "model_index.json", "pipeline.py", "run.json",
                                    "scheduler/scheduler_config.json", "scheduler/scheduling_tract.py", "unet/config.json",
                                    "unet/diffusion_pytorch_model.safetensors", "unet/tract_unet.py"]
    pipe = from_pretrained(out)
    assert type(pipe).__name__ == "TractPipeline" and type(pipe.unet).__name__ == "TractUNet"
    run = load_run(runs / "tract", with_data=False)
    noise = noise_from_seeds(SEEDS, (1, 8, 8))
    for k in (1, 8, 64):
        x = pipe(num_inference_steps=k, latents=noise, output_type="pt").images
        assert x.dtype == torch.float64 and torch.equal(x, images(ours(run, k))), k
    seeded = pipe(num_inference_steps=1, generator=[torch.Generator().manual_seed(s) for s in SEEDS], output_type="np")
    assert seeded.images.shape == (6, 8, 8, 1) and torch.equal(torch.from_numpy(seeded.images).permute(0, 3, 1, 2),
                                                                images(ours(run, 1)))
    assert len(pipe(generator=torch.Generator().manual_seed(0), batch_size=2).images) == 2  # PIL, K = 1 by default
    with pytest.raises(ValueError, match=r"K must divide T = 64, one of \[1, 2, 4, 8, 16, 32, 64\]"):
        pipe(num_inference_steps=3)
    with pytest.raises(ValueError, match="unconditional: leave class_labels out"):
        pipe(num_inference_steps=1, class_labels=[1])
    with pytest.raises(ValueError, match="takes no guidance weight"):
        pipe(num_inference_steps=1, guidance_weight=1.0)
    scheduler = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["logsnr"] == run.grid.logsnr.tolist() and scheduler["default_steps"] == 1
    assert scheduler["alpha"] == run.grid.alpha.tolist() and scheduler["distilled_steps"] == [64, 8, 1]
    exported = load_exported(out)  # our loader reads the diffusers layout too: the same state dict
    assert all(torch.equal(v, run.denoiser.state_dict()[k]) for k, v in exported.denoiser.state_dict().items())
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: diffusers\n") and "not** diffusers' `UNet2DModel`" in card


def test_guided_and_class_conditional_pipelines_sample_what_we_sample(runs, tmp_path, from_pretrained):
    labels = labels_from_seeds(SEEDS, 10)
    noise = noise_from_seeds(SEEDS, (1, 8, 8))
    cases = {"guided": (None, 0.0, 2.0), "stage1": (0.0, 1.0, 3.0)}  # classifier-free guidance; w as a network input
    for name, ws in cases.items():
        assert main([str(runs / name), "--format", "diffusers", "--out", str(tmp_path / name)]) == 0
        pipe, run = from_pretrained(tmp_path / name), load_run(runs / name, with_data=False)
        for w in ws:
            for k in (1, 8):
                x = pipe(num_inference_steps=k, latents=noise, class_labels=labels, guidance_weight=w, output_type="pt")
                assert torch.equal(x.images, images(ours(run, k, w))), (name, w, k)
        with pytest.raises(ValueError, match="class-conditional \\(10 classes\\): give class_labels"):
            pipe(num_inference_steps=1, latents=noise, guidance_weight=1.0)
    with pytest.raises(ValueError, match="takes a guidance weight w as an input: give guidance_weight"):
        pipe(num_inference_steps=1, latents=noise, class_labels=labels)


# ------------------------------------------------------------------------------------------- bad inputs

def refused(args, capsys, expect, folder):
    """The command exits with 2 and one line containing ``expect``, and ``folder`` is byte-identical after."""
    before = listing(folder)
    capsys.readouterr()
    assert main([str(a) for a in args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and expect in err, err
    assert listing(folder) == before


def test_bad_exports_are_one_line_and_write_nothing(runs, tmp_path, capsys, monkeypatch):
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine\n")
    refused([runs / "tract", "--out", full], capsys, f"--out {full} is not empty: choose a new folder", tmp_path)
    assert (full / "keep.txt").read_text() == "mine\n"
    refused([runs / "half", "--out", tmp_path / "a"], capsys, f"{runs / 'half'} is not a finished run (no ema.pt)", tmp_path)
    refused([runs / "edm", "--format", "diffusers", "--out", tmp_path / "b"], capsys,
            "is an EDM (VE) run: only --format safetensors applies, because", tmp_path)
    refused([runs / "tract", "--out", tmp_path / "c", "--metrics", tmp_path / "none.json"], capsys,
            "not an evaluation file", tmp_path)
    monkeypatch.setitem(sys.modules, "diffusers", None)  # as if not installed
    refused([runs / "tract", "--format", "diffusers", "--out", tmp_path / "d"], capsys,
            "needs the diffusers package, which is not installed: pip install 'tract-repro[export]'", tmp_path)
    monkeypatch.setitem(sys.modules, "safetensors", None)
    refused([runs / "tract", "--out", tmp_path / "e"], capsys,
            "needs the safetensors package, which is not installed: pip install 'tract-repro[export]'", tmp_path)


def test_an_export_that_fails_midway_leaves_nothing(runs, tmp_path, monkeypatch):
    pytest.importorskip("safetensors", reason=f"safetensors is {EXTRA}")
    from tract_repro.exporting import bundle

    monkeypatch.setattr(bundle, "render", lambda *a: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        main([str(runs / "tract"), "--out", str(tmp_path / "x")])
    assert list(tmp_path.iterdir()) == []  # neither the export nor its temporary folder
    monkeypatch.undo()
    (tmp_path / "empty").mkdir()  # an empty folder may be the target
    assert main([str(runs / "tract"), "--out", str(tmp_path / "empty")]) == 0
    assert (tmp_path / "empty" / "model.safetensors").is_file()
