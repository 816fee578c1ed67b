"""The diffusers layout of a latent run: a diffusers UNet behind our denoiser, exported as a stock pipeline.

The network maps 1:1: the adapter (:mod:`tract_repro.networks.diffusers_net`) feeds the stock
``UNet2DConditionModel`` the teacher's timestep τ(λ) and reads its head as ε or v, so ``unet/`` is that UNet (the
run's config, which is the teacher's, and its EMA weights as safetensors; the adapter's ∅ embedding is not a
UNet weight: diffusers encodes the empty prompt itself).  Our K-step DDIM on the T-grid of the teacher's
:class:`~tract_repro.diffusion.schedules.DiscreteSchedule` is diffusers' ``DDIMScheduler`` with

    timestep_spacing = "trailing"   grid(T) puts index i at τ_i = round(N·i/T) − 1: diffusers' trailing timesteps;
    set_alpha_to_one = True         the last step lands on ᾱ(−1) = 1 (λ = +∞), where DDIM returns x̂ itself;
    clip_sample = False             latents are unbounded, so our sampler leaves x̂ unclipped (run.json "bounded");
    prediction_type                 v → "v_prediction", eps → "epsilon" (x and both have no diffusers twin here);
    β schedule, steps_offset = 1    the teacher's β_n; trailing spacing never reads the offset (1 is what
                                    StableDiffusionPipeline expects: 0 makes it warn and rewrite the config).

diffusers steps from t to t − N//K, so a K-step sample is ours when K divides N and T.  A text model becomes a
``StableDiffusionPipeline`` with the teacher folder's ``vae/``, ``text_encoder/`` and ``tokenizer/`` copied; a
class-conditional one the UNet, VAE and scheduler with a short ``pipeline.py`` (``ClassLatentPipeline``).

A guided-distillation student (a UNet with diffusers' ``time_cond_proj_dim``: the network takes w) exports the same
way.  StableDiffusionPipeline itself feeds such a UNet ``timestep_cond = get_guidance_scale_embedding(guidance_scale −
1)``, the embedding e(w) of our adapter, and turns its own classifier-free guidance off (``do_classifier_free_guidance``
is false for it): one UNet call a step, so ``guidance_scale`` = 1 + w gives our K-step DDIM at w.  ClassLatentPipeline
does the same.  (The LatentConsistencyModelPipeline embeds the same w but steps with LCMScheduler; given a
DDIMScheduler it fails, passing ``original_inference_steps`` to its ``set_timesteps`` and ``eta=None`` to its ``step``.)
"""
import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

from tract_repro.common.errors import ConfigError
from tract_repro.common.files import write_text
from tract_repro.diffusion.schedules import DiscreteSchedule
from tract_repro.exporting.card import default_steps
from tract_repro.exporting.weights import save as save_weights
from tract_repro.networks.diffusers_net import DiffusersNet

SHIPPED = Path(__file__).resolve().parent / "shipped"
WEIGHTS = "unet/diffusion_pytorch_model.safetensors"
#: our parameterisation → diffusers' prediction_type
PREDICTION_TYPES = {"v": "v_prediction", "eps": "epsilon"}
#: component → the stem of the weights file diffusers (the VAE) and transformers (the text encoder) load by default
COMPONENTS = {"vae": "diffusion_pytorch_model", "text_encoder": "model"}


@dataclass
class Sources:
    """Where the copied components come from: ``vae``/``text_encoder``/``tokenizer`` folders (None if absent)."""

    text: bool
    folders: dict


def applies(run):
    """Whether the run's network is a diffusers model behind the adapter (this layout, not the PD UNet's)."""
    return isinstance(getattr(run.denoiser, "net", None), DiffusersNet)


def _component(folder, name):
    """``folder/name`` if it holds a config, else None."""
    if folder is None:
        return None
    path = Path(folder) / name
    return path if (path / ("config.json" if name != "tokenizer" else "tokenizer_config.json")).is_file() else None


def sources(run):
    """The VAE (and text encoder and tokenizer) to copy: the VAE from the folder the UNet came from, the text
    components from the folder that made ∅ (diffusers_network.empty_text_from, or the same folder)."""
    net = run.denoiser.net
    model, text = net.folders.get("model"), net.folders.get("text")
    names = ("vae", "text_encoder", "tokenizer") if net.text else ("vae",)
    found = {}
    for name in names:
        where = [model, text] if name == "vae" else [text, model]  # the text encoder that made ∅ first
        found[name] = next((p for p in (_component(f, name) for f in where) if p is not None), None)
        if found[name] is None:
            have = " or ".join(str(f) for f in where if f is not None) or "no folder (the network was built from a config)"
            raise ConfigError(f"{run.path}: no {name}/ to ship with the UNet in {have}: bind diffusers_network.folder "
                              f"to the teacher's diffusers folder, or use --format safetensors")
    return Sources(net.text, found)


def weight_files(directory, stem):
    """The safetensors weights of a component folder: ``stem.safetensors``, or its index and the shards it lists."""
    single, index = directory / f"{stem}.safetensors", directory / f"{stem}.safetensors.index.json"
    if single.is_file():
        return [single]
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text()).get("weight_map", {}).values()))
        return [index] + [directory / s for s in shards]
    raise ConfigError(f"{directory} has no {stem}.safetensors: fetch the component's safetensors weights into "
                      f"{directory} (an export copies no pickle)")


def check_run(run):
    """One line for a latent run that no stock diffusers pipeline reproduces; nothing is written before."""
    net, path = run.denoiser.net, run.path
    if not net.is_unet:
        raise ConfigError(f"{path}'s network is a {type(net.model).__name__}: --format diffusers exports a "
                          f"UNet2DConditionModel (text or class-conditional); use --format safetensors")
    parameterisation = run.denoiser.parameterisation
    if parameterisation not in PREDICTION_TYPES:
        raise ConfigError(f"{path} predicts {parameterisation!r}: a stock DDIMScheduler takes the v and eps heads "
                          f"this export maps (prediction_type v_prediction, epsilon); use --format safetensors")
    if not isinstance(run.grid.schedule, DiscreteSchedule):
        raise ConfigError(f"{path} runs on {type(run.grid.schedule).__name__}, not the teacher's DiscreteSchedule that "
                          f"DDIMScheduler computes: use --format safetensors")
    if run.bounded:
        raise ConfigError(f"{path} samples with x̂ clipped to [−1, 1] (its run.json records bounded data, or predates "
                          f"the \"bounded\" record), which DDIMScheduler's clip_sample does not reproduce (it keeps the "
                          f"network's ε̂): use --format safetensors, or train the run on latents again")
    K, N = default_steps(run.info), run.grid.schedule.N
    if N % K:
        raise ConfigError(f"{path} samples with K = {K} steps, which do not divide the {N} trained timesteps: "
                          f"DDIMScheduler steps from t to t − {N}//K and would leave the run's grid")
    found = sources(run)
    for name, stem in COMPONENTS.items():
        if name in found.folders:
            weight_files(found.folders[name], stem)


def scheduler(run):
    """diffusers' DDIMScheduler that steps as our K-step DDIM on the run's grid (module docstring)."""
    from diffusers import DDIMScheduler

    schedule = run.grid.schedule
    return DDIMScheduler(num_train_timesteps=schedule.N, beta_start=schedule.beta_start, beta_end=schedule.beta_end,
                         beta_schedule=schedule.beta_schedule, trained_betas=None, clip_sample=False,
                         set_alpha_to_one=True, steps_offset=1, prediction_type=PREDICTION_TYPES[
                             run.denoiser.parameterisation], thresholding=False, timestep_spacing="trailing",
                         rescale_betas_zero_snr=False)


def components(run):
    """(the stock UNet with the run's weights, its DDIMScheduler, the component folders to copy)."""
    return run.denoiser.net.model.eval(), scheduler(run), sources(run)


def valid_steps(run):
    """The K whose diffusers samples are ours: the divisors of gcd(T, N)."""
    g = math.gcd(run.grid.T, run.grid.schedule.N)
    return [k for k in range(1, g + 1) if g % k == 0]


def _class_entry(name, directory):
    """model_index.json's [library, class] of a copied component, from its own config."""
    if name == "tokenizer":
        return ["transformers", json.loads((directory / "tokenizer_config.json").read_text()).get("tokenizer_class",
                                                                                                  "CLIPTokenizer")]
    config = json.loads((directory / "config.json").read_text())
    if name == "vae":
        return ["diffusers", config.get("_class_name", "AutoencoderKL")]
    return ["transformers", (config.get("architectures") or ["CLIPTextModel"])[0]]


def write(folder, unet, ddim, found, meta):
    """unet/ (config, safetensors with ``meta``), scheduler/, the copied components and model_index.json."""
    import diffusers

    folder = Path(folder)
    unet.save_config(folder / "unet")
    config = json.loads((folder / "unet" / "config.json").read_text())
    config.pop("_name_or_path", None)  # the teacher's local path, which means nothing where the export goes
    write_text(folder / "unet" / "config.json", json.dumps(config, indent=2, sort_keys=True) + "\n")
    save_weights(unet.state_dict(), folder / WEIGHTS, meta)
    ddim.save_config(folder / "scheduler")
    index = {"_diffusers_version": diffusers.__version__, "scheduler": ["diffusers", "DDIMScheduler"],
             "unet": ["diffusers", type(unet).__name__]}
    for name, directory in found.folders.items():
        (folder / name).mkdir()
        if name == "tokenizer":
            files = [p for p in directory.iterdir() if p.is_file()]
        else:
            files = [directory / "config.json"] + weight_files(directory, COMPONENTS[name])
        for path in files:
            shutil.copyfile(path, folder / name / path.name)
        index[name] = _class_entry(name, directory)
    if found.text:
        index.update(_class_name="StableDiffusionPipeline", safety_checker=[None, None],
                     feature_extractor=[None, None], image_encoder=[None, None], requires_safety_checker=False)
    else:
        shutil.copyfile(SHIPPED / "latent_class_pipeline.py", folder / "pipeline.py")
        index["_class_name"] = ["pipeline", "ClassLatentPipeline"]
    write_text(folder / "model_index.json", json.dumps(dict(sorted(index.items())), indent=2) + "\n")


def denoiser_state(denoiser, unet_state):
    """The denoiser state dict of an exported UNet's weights: ``net.model.*`` from them, the rest (∅) as rebuilt."""
    state = {k: v for k, v in denoiser.state_dict().items() if not k.startswith("net.model.")}
    state.update({f"net.model.{k}": v for k, v in unet_state.items()})
    return state


def card(run):
    """(pipeline_tag, the card's Use and What-maps lines) of a latent export."""
    K, net = default_steps(run.info), run.denoiser.net
    sigma = math.sqrt(1 - float(run.grid.schedule.alphas_cumprod[-1]))
    steps = ", ".join(map(str, valid_steps(run)))
    prediction = PREDICTION_TYPES[run.denoiser.parameterisation]
    takes_w = "w" in net.extra_conditions
    low, high = run.info.get("w_range") or (None, None)
    scale = f"guidance_scale={1.0 + (high if high is not None else 1.0)}" if takes_w else "guidance_scale=1.0"
    if net.text:
        load = ["from diffusers import StableDiffusionPipeline", "",
                "pipe = StableDiffusionPipeline.from_pretrained('THIS_FOLDER')",
                f"image = pipe('a prompt', num_inference_steps={K}, {scale}).images[0]" + (
                    "  # guidance_scale = 1 + w" if takes_w else "")]
        what = ("- The folder is a stock `StableDiffusionPipeline`: `unet/` (diffusers' `UNet2DConditionModel`, the "
                "run's EMA weights), `vae/`, `text_encoder/` and `tokenizer/` (the teacher's, copied), `scheduler/` "
                "(`DDIMScheduler`). No code ships; nothing needs `trust_remote_code`.")
        guidance = ("- `guidance_scale` s > 1 is diffusers' classifier-free guidance with the empty prompt, our "
                    "x̂^w = (1 + w)·x̂(c) − w·x̂(∅) with s = 1 + w.")
    else:
        load = ["from diffusers import DiffusionPipeline", "",
                "pipe = DiffusionPipeline.from_pretrained('THIS_FOLDER', trust_remote_code=True)",
                f"images = pipe(class_labels=[0, 1, 2, 3], num_inference_steps={K}" + (
                    f", {scale}).images  # guidance_scale = 1 + w" if takes_w else ").images")]
        what = ("- `unet/` (diffusers' `UNet2DConditionModel`, the run's EMA weights), `vae/` (the teacher's), "
                "`scheduler/` (`DDIMScheduler`) are stock; `pipeline.py` (`ClassLatentPipeline`) is the only code, "
                "because no stock pipeline takes class labels for this UNet. `sampler=\"stochastic\"` runs Meng et al.'s "
                "stochastic N-step sampler instead of DDIM (for a student distilled for it: N = twice its steps), "
                "re-noising with `generator`.")
        guidance = ("- `guidance_scale` s > 1 guides with the null class (the UNet's last class row), our "
                    "x̂^w = (1 + w)·x̂(c) − w·x̂(∅) with s = 1 + w.")
    if takes_w:
        guidance = (f"- Guidance is a network input (guided distillation's w, trained on w ∈ [{low}, {high}]): the UNet has "
                    f"`time_cond_proj_dim` = {net.model.config.time_cond_proj_dim} and takes `timestep_cond` = "
                    f"`get_guidance_scale_embedding(w)`, which the pipeline computes from `guidance_scale = 1 + w` "
                    f"(`guidance_scale=1.0` is w = 0). One UNet call a step: the pipeline applies no classifier-free "
                    f"guidance on top for such a UNet (the student is guided already; negative prompts have no effect).")
    lines = ["", "## Use", "", f"With diffusers, K = {K} steps (the distilled step count; the pipelines' own default "
             f"of 50 steps is not this model's):", "", "```python", "import torch", *load, "```", "",
             "## What maps onto diffusers", "", what,
             f"- `scheduler/`: DDIMScheduler with `timestep_spacing=\"trailing\"`, `set_alpha_to_one=True`, "
             f"`clip_sample=False`, `prediction_type=\"{prediction}\"`, the teacher's β schedule and `steps_offset=1`: "
             f"its K steps are tract-repro's K-step DDIM (unclipped x̂, latents) for K in {steps} (K dividing T = "
             f"{run.grid.T} and the {run.grid.schedule.N} trained timesteps).",
             f"- The same sample as tract-repro's from standard noise z: pass `latents = {sigma:.6f}·z` (σ at the "
             f"noisiest timestep; tract-repro starts from σ·z, diffusers from the latents as given).", guidance,
             "- With tract-repro, `load_exported('THIS_FOLDER')` rebuilds the run from `config.gin` (which names the "
             "teacher's folder) and these weights; sample it with `registry.sample('ddim', ..., clip=False)`."]
    return ("text-to-image" if net.text else "unconditional-image-generation"), lines
