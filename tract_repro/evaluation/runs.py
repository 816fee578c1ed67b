"""A finished run: its inference-EMA denoiser rebuilt from the configuration saved beside it, and its record."""
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from tract_repro.common.errors import ConfigError
from tract_repro.config.runs import rebuild
from tract_repro.diffusion.grid import TimeGrid
from tract_repro.training import checkpoint as ckpt


@dataclass
class FinishedRun:
    path: Path
    info: dict
    denoiser: torch.nn.Module
    grid: TimeGrid
    data: object
    weights: Path
    options: object = None  # the run's resolved training Options (train.*)

    @property
    def bounded(self):
        """Whether the run's data lie in [−1, 1], as run.json records it (a run recorded before it said is): samplers
        clip x̂ there only if so, ``registry.sample(..., clip=run.bounded)``."""
        return bool(self.info.get("bounded", True))


def load_run(path, with_data=True):
    """The run at ``path`` with its ema.pt loaded; one-line error if it isn't finished.

    ``with_data = False`` leaves ``data`` None (image FID needs no training set in memory); ``"encoded"`` opens the
    data set only for a run on encoded (unbounded) data, whose samples its ``decode`` makes images (latents open
    memory-mapped, nothing is read into memory).
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
    info = json.loads((path / "run.json").read_text())
    if with_data == "encoded":
        with_data = info.get("bounded", True) is False
    run = rebuild(saved.read_text(), path, with_data)
    run.denoiser.load_state_dict(ckpt.load(weights))
    return FinishedRun(path, info, run.denoiser.eval().requires_grad_(False), run.grid, run.data, weights, run.options)


def sample_shape(run):
    """(C, H, W) of what a run's sampler draws: its data's latents for an encoded data set, else its images."""
    if getattr(run.data, "encoded", False):
        return tuple(run.data.shape)
    return image_shape(run.denoiser)


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
