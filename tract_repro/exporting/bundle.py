"""Export a finished run into a new folder, all or nothing, and load an export back (safetensors only, no pickle).

``safetensors``: ``model.safetensors`` (the inference EMA's denoiser state dict, with string metadata),
``config.gin``, ``run.json`` and ``README.md`` (the model card).  ``diffusers``: the same card, ``config.gin`` and
``run.json`` beside a diffusers pipeline folder (:mod:`tract_repro.exporting.diffusers_format` for the PD UNet,
whose ``unet/diffusion_pytorch_model.safetensors`` holds the same state dict; :mod:`~tract_repro.exporting.
diffusers_latent` for a diffusers UNet, a stock pipeline whose weights file holds the UNet's own state dict).

Everything is checked before anything is written: a non-empty ``--out`` is refused, a run that is not finished,
a format that does not apply to the run, a missing package, an evaluation file of other weights.  The files are
written into a hidden sibling folder, which is renamed to ``--out`` at the end, so a failure leaves nothing.
"""
import json
import shutil
from pathlib import Path

from tract_repro.common.errors import ConfigError
from tract_repro.common.files import atomic_folder, sha256
from tract_repro.config.runs import rebuild
from tract_repro.evaluation.runs import FinishedRun, load_run
import tract_repro.exporting.diffusers_format as diffusers_format
import tract_repro.exporting.diffusers_latent as diffusers_latent
from tract_repro.exporting.card import evaluations, render
from tract_repro.exporting.weights import load as load_weights, require, run_metadata, save as save_weights

FORMATS = ("safetensors", "diffusers")
WEIGHTS = {"safetensors": "model.safetensors", "diffusers": "unet/diffusion_pytorch_model.safetensors"}


def check_out(out):
    """One line if ``out`` exists and is not an empty folder: nothing is ever overwritten."""
    out = Path(out)
    if out.is_dir() and any(out.iterdir()):
        raise ConfigError(f"--out {out} is not empty: choose a new folder (an export never overwrites anything)")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file: choose a new folder (an export never overwrites anything)")


def export_run(run_dir, fmt="safetensors", out=None, metrics=(), search=Path("results")):
    """Write the export of the finished run ``run_dir`` to the new folder ``out``; returns (out, the evaluations used)."""
    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt}: choose one of {', '.join(FORMATS)}")
    out = Path(out)
    check_out(out)
    run = load_run(run_dir, with_data=False)
    ema_sha256 = sha256(run.weights)
    found = evaluations(run.path, ema_sha256, metrics, search)
    parts = layout = card = None
    if fmt == "diffusers":
        layout = diffusers_latent if diffusers_latent.applies(run) else diffusers_format
        layout.check_run(run)
        require("diffusers", fmt)
    require("safetensors", fmt)
    if fmt == "diffusers":
        parts = layout.components(run)
        card = diffusers_latent.card(run) if layout is diffusers_latent else None
    meta = run_metadata(run, ema_sha256)
    try:
        with atomic_folder(out) as tmp:
            if parts is None:
                save_weights(run.denoiser.state_dict(), tmp / WEIGHTS[fmt], meta)
            else:
                layout.write(tmp, *parts, meta)
            shutil.copyfile(run.path / "config.gin", tmp / "config.gin")
            shutil.copyfile(run.path / "run.json", tmp / "run.json")
            text = render(run, fmt, ema_sha256, WEIGHTS[fmt], sha256(tmp / WEIGHTS[fmt]), found, card)
            (tmp / "README.md").write_text(text)
    except FileExistsError:
        raise ConfigError(f"--out {out} was written to meanwhile: choose a new folder") from None
    return out, found


def load_exported(folder):
    """The exported run in ``folder`` (either format) as a :class:`FinishedRun`: its denoiser rebuilt from
    ``config.gin`` and loaded from the safetensors weights (no pickle), its grid and run.json; ``data`` is None."""
    folder = Path(folder)
    present = [WEIGHTS[f] for f in FORMATS if (folder / WEIGHTS[f]).is_file()]
    if not (folder / "config.gin").is_file() or not present:
        raise ConfigError(f"{folder} is not an export (no config.gin and model.safetensors): write one with "
                          f"`python -m tract_repro.export RUN --out {folder}`")
    require("safetensors", "safetensors")
    run = rebuild((folder / "config.gin").read_text(), folder, with_data=False)
    state, _ = load_weights(folder / present[0])
    if present[0] == WEIGHTS["diffusers"] and diffusers_latent.applies(run):  # the stock UNet's weights alone
        state = diffusers_latent.denoiser_state(run.denoiser, state)
    try:
        run.denoiser.load_state_dict(state)
    except RuntimeError:
        raise ConfigError(f"{folder / present[0]} does not fit the network of {folder / 'config.gin'}: export the run "
                          f"again") from None
    info = json.loads((folder / "run.json").read_text()) if (folder / "run.json").is_file() else {}
    return FinishedRun(folder, info, run.denoiser.eval().requires_grad_(False), run.grid, None, folder / present[0],
                       run.options)
