"""A guided (w-conditioned) latent student exported as a diffusers pipeline that takes the guidance weight.

Stage 1 of guided distillation on the tiny folders of tests/tiny_diffusers.py (T = 8, a text model with v prediction,
a class-conditional one with ε), trained through ``python -m tract_repro.launch`` with a w input
(``diffusers_network.time_cond_proj_dim``), its EMA's ``cond_proj`` then moved well away from zero so that w changes
every step, is exported with ``python -m tract_repro.export --format diffusers`` and loaded back by diffusers offline.
The text student is a stock ``StableDiffusionPipeline`` (no code ships): for a UNet with ``time_cond_proj_dim`` it feeds
``timestep_cond = get_guidance_scale_embedding(guidance_scale − 1)`` and turns its own classifier-free guidance off,
so ``guidance_scale`` = 1 + w.  The class student's shipped ``ClassLatentPipeline`` does the same.  From the same
latents, K = 1, 2, 4 steps of the pipeline at guidance_scale = 1 + w equal our K-step DDIM at w, for w ∈ {0, 2, 7},
within test_latent_export's tolerances; different w give different samples.
"""
import json
import subprocess
import sys

import pytest
import torch

from tests import tiny_diffusers as tiny
from tests.test_export import listing
from tests.test_latent_export import LABELS, PROMPTS, ROOT, SEEDS, SHAPE, TEXT, close, export, offline, ours, start  # noqa: F401,E501
from tests.tiny_latents import CPU_RUN
from tract_repro.data.latent_models import Encoders
from tract_repro.evaluation.runs import load_run
from tract_repro.networks.conditioning import Cond
from tract_repro.training import checkpoint as ckpt

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

D = 32  # the students' time_cond_proj_dim
W = (0.0, 2.0, 7.0)
PROJ = "net.model.time_embedding.cond_proj.weight"

STAGE_1 = """
import tests.tiny_latents
train.dataset = @tiny_latents
tiny_latents.n = 16
{data}
train.network = @diffusers_network
diffusers_network.folder = '{folder}'
diffusers_network.time_cond_proj_dim = {dim}
train.schedule = @diffusers_schedule
diffusers_schedule.folder = '{folder}'
train.teacher = '{folder}'
train.T = 8
train.parameterisation = '{parameterisation}'
train.method = @GuidedDistillation()
GuidedDistillation.w_max = 4.0
TeacherTraining.sample_steps = 4
train.batch_size = 4
train.total = 8
train.checkpoint_every = 8
""" + CPU_RUN


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The tiny folders and a finished guided stage-1 student of each, its cond_proj perturbed in ema.pt."""
    root = tmp_path_factory.mktemp("latent_export_guided")
    folders = dict(text=tiny.stable_diffusion_folder(root / "sd", prediction_type="v_prediction"),
                   classes=tiny.class_conditional_folder(root / "classes", prediction_type="epsilon"))
    settings = dict(text=dict(data=f"tiny_latents.text_shape = {TEXT}", parameterisation="v"),
                    classes=dict(data="tiny_latents.num_classes = 10", parameterisation="eps"))
    for kind, folder in folders.items():
        gin_file = root / f"{kind}.gin"
        gin_file.write_text(STAGE_1.format(folder=folder, dim=D, **settings[kind]))
        done = subprocess.run([sys.executable, "-m", "tract_repro.launch", str(gin_file), "--workdir", str(root / kind)],
                              cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        ema = ckpt.load(root / kind / "ema.pt")
        ema[PROJ] = 0.3 * torch.randn(ema[PROJ].shape, generator=torch.Generator().manual_seed(7), dtype=ema[PROJ].dtype)
        ckpt.save_atomic(ema, root / kind / "ema.pt")
    return dict(root=root, folders=folders, text=root / "text", classes=root / "classes")


def w_cond(cond, w):
    return Cond(cond.labels, {**cond.extra, "w": torch.full((len(cond.labels),), w, dtype=torch.float64)})


def compare(run, sample, cond, kind):
    """Pipeline (guidance_scale = 1 + w) against ours at w, K = 1, 2, 4; returns the K = 2 samples per w."""
    noise, latents = start(run)
    samples = {}
    for w in W:
        for k in (1, 2, 4):
            theirs = sample(k, 1.0 + w, latents)
            mine = ours(run, k, noise, w_cond(cond, w))
            print(f"guided {kind} student, w = {w}, K = {k}: max |Δ| = %.3g, relative %.3g" % close(theirs, mine))
            if k == 2:
                samples[w] = theirs
    for a, b in zip(W, W[1:]):  # w is wired: every weight gives another sample
        assert (samples[a] - samples[b]).abs().max() > 1e-2, (a, b)
    return samples


def test_a_guided_text_student_is_a_stock_stable_diffusion_pipeline_with_guidance_scale_1_plus_w(runs, tmp_path, offline):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    run = load_run(runs["text"], with_data=False)
    assert run.denoiser.net.extra_conditions == ("w",) and run.info["guided"] and run.info["w_range"] == [0.0, 4.0]
    out = export(runs["text"], tmp_path / "guided_sd")
    assert not any(name.endswith(".py") for name in listing(out))  # no code ships
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert json.loads((out / "unet" / "config.json").read_text())["time_cond_proj_dim"] == D
    pipe = StableDiffusionPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe.scheduler) is DDIMScheduler and pipe.unet.time_embedding.cond_proj.weight.abs().min() > 0
    teacher = runs["folders"]["text"]
    cond = Cond(torch.zeros(len(PROMPTS), dtype=torch.long), {"text": Encoders(teacher).text(PROMPTS)})

    def sample(k, scale, latents, **kw):
        return pipe(PROMPTS, num_inference_steps=k, guidance_scale=scale, latents=latents, output_type="latent",
                    **kw).images

    samples = compare(run, sample, cond, "text")
    _, latents = start(run)  # no classifier-free guidance on top: a negative prompt changes nothing
    assert torch.equal(sample(2, 3.0, latents, negative_prompt=["giants"] * 4), samples[2.0])
    card = (out / "README.md").read_text()
    assert "guidance_scale = 1 + w" in card and "w ∈ [0.0, 4.0]" in card and "nothing needs `trust_remote_code`" in card
    assert "classifier-free guidance with the empty prompt" not in card  # the unguided student's line


def test_a_guided_class_student_takes_w_as_guidance_scale_minus_1(runs, tmp_path, offline):
    from diffusers import DiffusionPipeline

    run = load_run(runs["classes"], with_data=False)
    out = export(runs["classes"], tmp_path / "guided_classes")
    pipe = DiffusionPipeline.from_pretrained(out, trust_remote_code=True)
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe).__name__ == "ClassLatentPipeline" and pipe.unet.config.time_cond_proj_dim == D
    calls = []
    pipe.unet.register_forward_hook(lambda module, args, output: calls.append(args[0].shape[0]))

    def sample(k, scale, latents):
        return pipe(class_labels=LABELS, num_inference_steps=k, guidance_scale=scale, latents=latents,
                    output_type="latent").images

    compare(run, sample, Cond(torch.tensor(LABELS)), "class")
    assert set(calls) == {len(LABELS)}  # one call a step on the batch itself: no second, unconditional half
    card = (out / "README.md").read_text()
    assert "guidance_scale = 1 + w" in card and "w ∈ [0.0, 4.0]" in card


def test_the_class_pipeline_runs_meng_et_al_s_stochastic_sampler_as_ours(runs, tmp_path, offline):
    """``sampler="stochastic"`` given our re-noising draws (``renoise``) is our stochastic sampler, at N = 2 and 4 steps
    and at two w; drawn from the generator instead it is another sample, and an unknown sampler is refused."""
    from diffusers import DiffusionPipeline

    from tract_repro.sampling import registry
    from tract_repro.sampling.stochastic import seeded_noise

    run = load_run(runs["classes"], with_data=False)
    pipe = DiffusionPipeline.from_pretrained(export(runs["classes"], tmp_path / "stochastic"), trust_remote_code=True)
    pipe.set_progress_bar_config(disable=True)
    noise, latents = start(run)
    cond = Cond(torch.tensor(LABELS))
    draws = seeded_noise(SEEDS, SHAPE)

    def sample(n, w, **kw):
        return pipe(class_labels=LABELS, num_inference_steps=n, guidance_scale=1.0 + w, latents=latents,
                    output_type="latent", sampler="stochastic", **kw).images

    for n in (2, 4):
        for w in (0.0, 7.0):
            mine = registry.sample("stochastic", run.denoiser, run.grid, n, noise, w_cond(cond, w), seeds=SEEDS,
                                   clip=False)
            theirs = sample(n, w, renoise=draws)
            print(f"stochastic class student, w = {w}, N = {n}: max |Δ| = %.3g, relative %.3g" % close(theirs, mine))
    other = sample(4, 0.0, generator=torch.Generator().manual_seed(0))
    assert (other - sample(4, 0.0, renoise=draws)).abs().max() > 1e-2  # the re-noising draws matter
    with pytest.raises(ValueError, match="sampler='heun'"):
        pipe(class_labels=LABELS, num_inference_steps=2, sampler="heun")
