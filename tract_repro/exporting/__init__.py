"""Finished runs as files other tools load: safetensors weights with a model card, and diffusers pipelines.

The command is ``python -m tract_repro.export RUN --format safetensors|diffusers --out DIR``
(:mod:`tract_repro.export`); :func:`load_exported` reads an export back into our denoiser.  ``bundle.py``
checks and writes an export, ``weights.py`` reads and writes safetensors, ``card.py`` writes the model card and
finds the run's evaluations, ``diffusers_format.py`` writes the diffusers layout of a PD UNet run,
``diffusers_latent.py`` that of a latent run (a diffusers UNet: a stock pipeline with diffusers' DDIMScheduler), and
``shipped/`` holds the files copied into them (the pipelines and the PD UNet's two components).
"""
from tract_repro.exporting.bundle import FORMATS, export_run, load_exported

__all__ = ["FORMATS", "export_run", "load_exported"]
