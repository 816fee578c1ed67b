"""The diffusers layout of an export: ``model_index.json``, ``pipeline.py``, ``unet/`` and ``scheduler/``.

What maps and what does not.  Our networks do not map 1:1 onto diffusers' ``UNet2DModel``: the PD UNet
(:mod:`tract_repro.networks.unet`, which the Google PD checkpoints are read into as well) takes the log-SNR λ as
its time input through u = arctan(exp(−λ/2))/(π/2), sums its class and guidance-weight embeddings into the
time embedding, and lays its blocks out in its own way.  So ``unet/`` is a diffusers ModelMixin/ConfigMixin
component (``shipped/tract_unet.py``) that builds our network from the keyword arguments the run's network was
built with (``UNet.init_kwargs``), its weights stored as diffusers stores any model's (``diffusion_pytorch_model.safetensors``, keys
``net.*`` as in our denoiser's state dict).  diffusers' DDIMScheduler does not fit either (its timestep grid and
its float32 step are not the run's), so ``scheduler/`` holds the run's grid (λ, α, σ at i = 0..T) as data and
``pipeline.py`` writes out our K-step DDIM loop (clipped x̂, float64), which reproduces ``registry.sample('ddim',
…)`` from the same noise.  Only VP runs with the PD UNet have this layout; EDM VE runs export as safetensors.
"""
import json
import shutil
from pathlib import Path

import torch

from tract_repro.common.errors import ConfigError
from tract_repro.exporting.card import default_steps, guidance_mode
from tract_repro.exporting.weights import save as save_weights
from tract_repro.networks.denoiser import VPDenoiser
from tract_repro.networks.unet import UNet

SHIPPED = Path(__file__).resolve().parent / "shipped"
WEIGHTS = "unet/diffusion_pytorch_model.safetensors"


def check_run(run):
    """One line if the run has no diffusers layout: an EDM (VE) run, or a network other than the PD UNet."""
    if getattr(run.grid.schedule, "process", "vp") != "vp" or not isinstance(run.denoiser, VPDenoiser):
        raise ConfigError(f"{run.path} is an EDM (VE) run: only --format safetensors applies, because the diffusers "
                          f"pipeline is our VP DDIM sampler (α² + σ² = 1, a v/ε/x-head UNet), which EDM's σ-preconditioned "
                          f"network and VE sampler do not fit")
    if not isinstance(run.denoiser.net, UNet):
        raise ConfigError(f"{run.path}'s network is a {type(run.denoiser.net).__name__}, not the PD UNet the diffusers "
                          f"component builds: use --format safetensors")


def network_kwargs(run):
    """The PD UNet's constructor arguments, as the run's network was built with them, in JSON."""
    kwargs = {}
    for name, value in run.denoiser.net.init_kwargs.items():
        value = list(value) if isinstance(value, tuple) else value
        try:
            json.dumps(value)
        except TypeError:
            raise ConfigError(f"UNet.{name} = {value!r} cannot be written to a diffusers config: use "
                              f"--format safetensors") from None
        kwargs[name] = value
    return kwargs


def components(run):
    """(unet, scheduler) of the run as the shipped classes, the unet checked against the run's own network."""
    from tract_repro.exporting.shipped.scheduling_tract import TractDDIMScheduler
    from tract_repro.exporting.shipped.tract_unet import TractUNet

    kwargs = network_kwargs(run)
    unet = TractUNet(network="UNet", network_kwargs=kwargs).eval()
    try:
        unet.net.load_state_dict(run.denoiser.net.state_dict())
    except RuntimeError:
        raise ConfigError(f"{run.path}: the network built from its config.gin does not take its ema.pt weights: "
                          f"use --format safetensors") from None
    if not _same_network(run.denoiser.net, unet.net):
        raise ConfigError(f"{run.path}: the network built from its config.gin computes another function than the "
                          f"run's: use --format safetensors")
    grid, info = run.grid, run.info
    scheduler = TractDDIMScheduler(
        T=grid.T, logsnr=grid.logsnr.tolist(), alpha=grid.alpha.tolist(), sigma=grid.sigma.tolist(),
        noise_schedule=type(grid.schedule).__name__, process="vp", parameterisation=run.denoiser.parameterisation,
        clip_x0=True, distilled_steps=list(info.get("schedule_steps") or []), default_steps=default_steps(info),
        guidance=guidance_mode(run), w_range=info.get("w_range"))
    return unet, scheduler


@torch.no_grad()
def _same_network(ours, theirs):
    """Whether two networks give the same output on a seeded probe input (the same weights, so bit for bit)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, ours.in_channels, ours.resolution, ours.resolution, generator=g)
    logsnr = torch.tensor([-3.0, 5.0])
    labels = torch.tensor([0, ours.num_classes - 1]) if ours.num_classes > 1 else None
    cond = {name: torch.tensor([0.5, 2.0]) for name in ours.extra_conditions} or None
    return torch.equal(ours.eval()(x, logsnr, labels, cond=cond), theirs.eval()(x, logsnr, labels, cond=cond))


def write(folder, unet, scheduler, meta):
    """The diffusers folder: model_index.json, pipeline.py, unet/ (config, weights, code), scheduler/ (config, code)."""
    import diffusers

    folder = Path(folder)
    unet.save_config(folder / "unet")
    save_weights(unet.state_dict(), folder / WEIGHTS, meta)
    scheduler.save_config(folder / "scheduler")
    for name, into in (("pipeline.py", "."), ("tract_unet.py", "unet"), ("scheduling_tract.py", "scheduler")):
        shutil.copyfile(SHIPPED / name, folder / into / name)
    index = {"_class_name": ["pipeline", "TractPipeline"], "_diffusers_version": diffusers.__version__,
             "scheduler": ["scheduling_tract", "TractDDIMScheduler"], "unet": ["tract_unet", "TractUNet"]}
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
