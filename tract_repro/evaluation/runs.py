"""Rebuild a finished run's inference-EMA denoiser from the configuration saved beside it."""
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from tract_repro import config
from tract_repro.common.errors import ConfigError
from tract_repro.diffusion.grid import TimeGrid
from tract_repro.diffusion.schedules import CosineSchedule
from tract_repro.networks.denoiser import build_denoiser
from tract_repro.training import checkpoint as ckpt


@dataclass
class FinishedRun:
    path: Path
    info: dict
    denoiser: torch.nn.Module
    grid: TimeGrid
    data: object
    weights: Path


def load_run(path, with_data=True):
    """The run at ``path`` with its ema.pt loaded; one-line error if it isn't finished.

    ``with_data = False`` leaves ``data`` None (image FID needs no training set in memory).
    """
    path = Path(path)
    weights, saved = path / "ema.pt", path / "config.gin"
    if not path.is_dir():
        raise ConfigError(f"{path} is not a run directory: train it first with `python -m tract_repro.launch "
                          f"<its gin files> --workdir {path}`")
    if not (weights.is_file() and saved.is_file()):
        how = (f"finish it with `python -m tract_repro.launch {saved} --workdir {path}`" if saved.is_file()
               else f"train it with `python -m tract_repro.launch <its gin files> --workdir {path}`")
        raise ConfigError(f"{path} is not a finished run (no ema.pt): {how}, then evaluate it")
    denoiser, grid = rebuild(saved.read_text())
    denoiser.load_state_dict(ckpt.load(weights))
    data = config.build("train.dataset") if with_data else None
    info = json.loads((path / "run.json").read_text())
    return FinishedRun(path, info, denoiser.eval().requires_grad_(False), grid, data, weights)


def rebuild(config_text):
    """(denoiser, grid) of a run's saved configuration, the network freshly initialised; gin is left parsed with it
    (so ``train.dataset`` and the network's bindings can be read next)."""
    config.parse(text=config_text)
    schedule = config.build("train.schedule", CosineSchedule)
    grid = TimeGrid(schedule, config.query("train.T", 1024))
    denoiser = build_denoiser(config.build("train.network"), schedule, config.query("train.parameterisation", "v"))
    return denoiser, grid


def image_shape(denoiser):
    """(C, H, W) of the images a run's network makes (PD UNet or EDM net)."""
    net = denoiser.net
    if hasattr(net, "img_resolution"):
        return (net.img_channels, net.img_resolution, net.img_resolution)
    return (net.in_channels, net.resolution, net.resolution)


def per_weight_outputs(out, ws):
    """{w: metrics file} for an ``--out`` that may hold ``{w}`` (one file per guidance weight, ``{w}`` → w), or None
    when ``out`` names one file for every w; one line if ``{w}`` is asked for without guidance weights."""
    if out is None or "{w}" not in str(out):
        return None
    if None in ws:
        raise ConfigError(f"--out {out}: a file per guidance weight ({{w}}) needs --w, e.g. --w 0 1 4")
    return {w: Path(str(out).replace("{w}", f"{w:g}")) for w in ws}
