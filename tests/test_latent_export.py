"""A distilled latent student exported as a stock diffusers pipeline (tract_repro/exporting/diffusers_latent.py).

Two BTD students of the tiny folders of tests/tiny_diffusers.py, trained through ``python -m tract_repro.launch``
on T = 8 (a text model with v prediction, 8 → 4 → 2 steps; a class-conditional one with ε, 8 → 4 → 2 → 1), are
exported with ``python -m tract_repro.export --format diffusers`` and loaded back by diffusers as a user loads them,
offline and without overrides.  From the same starting latents (ours start from σ_T·z, so the pipeline is given
σ_T·z) and the same prompt or class labels, K steps of the pipeline (float32) equal our K-step DDIM (float64
steps, float32 network) for K = 1, 2 and 4, within ATOL; clipping x̂ as for pixels would not.
"""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests import tiny_diffusers as tiny
from tests.test_export import listing, refused
from tests.tiny_latents import CPU_RUN
from tract_repro.data.latent_models import Encoders
from tract_repro.evaluation.runs import load_run
from tract_repro.export import main
from tract_repro.exporting import load_exported
from tract_repro.networks.conditioning import Cond
from tract_repro.sampling import registry
from tract_repro.sampling.samplers import noise_from_seeds

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]
TEXT = (tiny.MAX_TOKENS, tiny.TEXT_WIDTH)
SHAPE = (tiny.LATENT_CHANNELS, tiny.LATENT_SIZE, tiny.LATENT_SIZE)
SEEDS = range(4)
PROMPTS = ["the digits", "a cat", "", "giants"]
LABELS = [0, 3, 7, 9]
#: float32 pipeline against float64 DDIM steps around the same float32 network: |Δ| ≤ ATOL + RTOL·|ours|.  Measured
#: for K = 1, 2, 4: max |Δ| ≤ 1.0e-6 for the v student, whose samples are O(1); ≤ 2.8e-5 for the ε student, whose
#: x̂ = (x_t − σ·ε̂)/α (α_T = 0.068) of a random tiny UNet reaches |x| ≈ 40, i.e. |Δ| ≤ 1e-6·max(1, |ours|): float32 rounding
ATOL, RTOL = 2e-6, 2e-6


def close(theirs, mine):
    """Assert the pipeline's float32 sample is ours to float32 precision; returns max |Δ| and max |Δ|/max(1, |ours|)."""
    diff = (theirs.double() - mine).abs()
    torch.testing.assert_close(theirs.double(), mine, rtol=RTOL, atol=ATOL)
    return diff.max().item(), (diff / mine.abs().clamp(min=1)).max().item()

STUDENT = """
import tests.tiny_latents
train.dataset = @tiny_latents
tiny_latents.n = 16
{data}
train.network = @diffusers_network
diffusers_network.folder = '{folder}'
train.schedule = @diffusers_schedule
diffusers_schedule.folder = '{folder}'
train.teacher = '{folder}'
train.T = 8
train.parameterisation = '{parameterisation}'
train.method = @BTD()
BTD.final_steps = {final}
train.batch_size = 4
train.total = {total}
train.checkpoint_every = 64
""" + CPU_RUN


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The tiny folders (text: v prediction; classes: ε) and a finished BTD student of each."""
    root = tmp_path_factory.mktemp("latent_export")
    folders = dict(text=tiny.stable_diffusion_folder(root / "sd", prediction_type="v_prediction"),
                   classes=tiny.class_conditional_folder(root / "classes", prediction_type="epsilon"))
    settings = dict(text=dict(data=f"tiny_latents.text_shape = {TEXT}", parameterisation="v", final=2, total=8),
                    classes=dict(data="tiny_latents.num_classes = 10", parameterisation="eps", final=1, total=12))
    for kind, folder in folders.items():
        gin_file = root / f"{kind}.gin"
        gin_file.write_text(STUDENT.format(folder=folder, **settings[kind]))
        done = subprocess.run([sys.executable, "-m", "tract_repro.launch", str(gin_file), "--workdir", str(root / kind)],
                              cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
    return dict(root=root, folders=folders, text=root / "text", classes=root / "classes")


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """diffusers as a user runs it on the export, offline; code it copies out of a folder goes under tmp_path."""
    from diffusers.utils import dynamic_modules_utils

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(dynamic_modules_utils, "HF_MODULES_CACHE", str(tmp_path / "hf_modules"))
    monkeypatch.setattr(sys, "path", list(sys.path))


def export(run, out):
    assert main([str(run), "--format", "diffusers", "--out", str(out)]) == 0
    return out


def start(run):
    """Standard noise z of SEEDS and the pipeline's latents σ_T·z (float32), from which both samplers start."""
    z = noise_from_seeds(SEEDS, SHAPE)
    _, sigma = run.grid.alpha_sigma(run.grid.logsnr[-1:])
    latents = (sigma * z).float()
    return latents.double() / sigma, latents  # our z, scaled by σ_T inside registry.sample, is the same x_T


def ours(run, k, noise, cond, clip=None):
    return registry.sample("ddim", run.denoiser, run.grid, k, noise, cond, clip=run.bounded if clip is None else clip)


def check_scheduler(folder, prediction_type):
    from diffusers import DDIMScheduler

    saved = DDIMScheduler.from_pretrained(folder, subfolder="scheduler")
    config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    expected = dict(timestep_spacing="trailing", set_alpha_to_one=True, clip_sample=False, steps_offset=1,
                    prediction_type=prediction_type, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                    num_train_timesteps=1000, thresholding=False, rescale_betas_zero_snr=False)
    assert {k: config[k] for k in expected} == expected
    return saved


def check_unet(folder, run, teacher):
    """The exported UNet is diffusers' own class, the teacher's config and the run's weights, bit for bit."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", use_safetensors=True)
    mine = run.denoiser.net.model.state_dict()
    theirs = unet.state_dict()
    assert theirs.keys() == mine.keys() and all(torch.equal(theirs[k], mine[k]) for k in mine)
    assert not (folder / "unet" / "diffusion_pytorch_model.bin").exists()
    public = lambda path: {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}  # noqa: E731
    assert public(folder / "unet" / "config.json") == public(teacher / "unet" / "config.json")
    assert "_name_or_path" not in json.loads((folder / "unet" / "config.json").read_text())  # no local path leaks


def test_a_text_student_is_a_stock_stable_diffusion_pipeline(runs, tmp_path, offline, capsys):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    run = load_run(runs["text"], with_data=False)
    assert run.info["bounded"] is False and not run.bounded  # latents: sampled unclipped
    out = export(runs["text"], tmp_path / "sd_student")
    teacher = runs["folders"]["text"]
    files = sorted(listing(out))
    assert not any(name.endswith(".py") for name in files)  # no code ships: every component is diffusers' own
    for part in ("vae", "text_encoder", "tokenizer"):  # the teacher's, copied byte for byte
        assert {k: v for k, v in listing(out).items() if k.startswith(f"{part}/")} == \
            {f"{part}/{k}": v for k, v in listing(teacher / part).items()}, part
    assert {"model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
            "scheduler/scheduler_config.json", "README.md", "config.gin", "run.json"} <= set(files)
    check_unet(out, run, teacher)
    scheduler = check_scheduler(out, "v_prediction")
    pipe = StableDiffusionPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe.scheduler) is DDIMScheduler and type(pipe.unet).__name__ == "UNet2DConditionModel"
    assert dict(pipe.scheduler.config) == dict(scheduler.config)  # loaded as saved: nothing for the pipeline to rewrite
    for k in (1, 2, 4):
        pipe.scheduler.set_timesteps(k)
        scheduler.set_timesteps(k)
        assert torch.equal(pipe.scheduler.timesteps, scheduler.timesteps)
        assert pipe.scheduler.timesteps.tolist() == [round(1000 * i / 8) - 1 for i in range(8, 0, -8 // k)]

    noise, latents = start(run)
    cond = Cond(torch.zeros(len(PROMPTS), dtype=torch.long), {"text": Encoders(teacher).text(PROMPTS)})
    for k in (1, 2, 4):
        theirs = pipe(PROMPTS, num_inference_steps=k, guidance_scale=1.0, latents=latents, output_type="latent").images
        mine = ours(run, k, noise, cond)
        print(f"text student, K = {k}: max |Δ| = %.3g, relative %.3g" % close(theirs, mine))
        assert (theirs.double() - ours(run, k, noise, cond, clip=True)).abs().max() > 1e-3  # clipping would differ
    exported = load_exported(out)  # our loader reads the stock UNet back into the run's denoiser (∅ as rebuilt)
    assert all(torch.equal(v, run.denoiser.state_dict()[k]) for k, v in exported.denoiser.state_dict().items())
    assert not exported.bounded and torch.equal(ours(exported, 2, noise, cond), ours(run, 2, noise, cond))
    card = (out / "README.md").read_text()
    assert "pipeline_tag: text-to-image" in card and "num_inference_steps=2" in card and "K = 2 steps" in card
    assert "unclipped x̂" in card and "clipped x̂)" not in card.replace("unclipped x̂)", "")


def test_a_class_student_is_a_diffusers_pipeline_of_stock_components(runs, tmp_path, offline):
    from diffusers import AutoencoderKL, DDIMScheduler, DiffusionPipeline, UNet2DConditionModel

    run = load_run(runs["classes"], with_data=False)
    out = export(runs["classes"], tmp_path / "class_student")
    teacher = runs["folders"]["classes"]
    assert sorted(listing(out)) == ["README.md", "config.gin", "model_index.json", "pipeline.py", "run.json",
                                    "scheduler/scheduler_config.json", "unet/config.json",
                                    "unet/diffusion_pytorch_model.safetensors", "vae/config.json",
                                    "vae/diffusion_pytorch_model.safetensors"]
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline", "ClassLatentPipeline"] and index["vae"] == ["diffusers", "AutoencoderKL"]
    check_unet(out, run, teacher)
    scheduler = check_scheduler(out, "epsilon")
    pipe = DiffusionPipeline.from_pretrained(out, trust_remote_code=True)
    pipe.set_progress_bar_config(disable=True)
    assert (type(pipe.unet), type(pipe.vae), type(pipe.scheduler)) == (UNet2DConditionModel, AutoencoderKL, DDIMScheduler)
    assert dict(pipe.scheduler.config) == dict(scheduler.config)

    noise, latents = start(run)
    cond = Cond(torch.tensor(LABELS))
    for k in (1, 2, 4):
        theirs = pipe(class_labels=LABELS, num_inference_steps=k, latents=latents, output_type="latent").images
        mine = ours(run, k, noise, cond)
        print(f"class student, K = {k}: max |Δ| = %.3g, relative %.3g" % close(theirs, mine))
    decoded = pipe(class_labels=LABELS[:2], num_inference_steps=1, generator=torch.Generator().manual_seed(0),
                   output_type="pt").images
    assert decoded.shape == (2, 3, tiny.IMAGE_SIZE, tiny.IMAGE_SIZE)
    with pytest.raises(ValueError, match="class_labels must be classes 0..9"):
        pipe(class_labels=[10], num_inference_steps=1)


def test_an_x_head_and_an_existing_folder_are_refused_and_nothing_is_written(runs, tmp_path, capsys):
    x_run = tmp_path / "x_run"
    shutil.copytree(runs["classes"], x_run)
    gin_file = x_run / "config.gin"
    gin_file.write_text(gin_file.read_text().replace("train.parameterisation = 'eps'", "train.parameterisation = 'x'"))
    refused([x_run, "--format", "diffusers", "--out", tmp_path / "x_export"], capsys,
            "predicts 'x': a stock DDIMScheduler takes the v and eps heads", tmp_path)
    assert not (tmp_path / "x_export").exists()
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine\n")
    refused([runs["text"], "--format", "diffusers", "--out", full], capsys, f"--out {full} is not empty", tmp_path)
    assert (full / "keep.txt").read_text() == "mine\n"
