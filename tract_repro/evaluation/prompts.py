"""The prompts a text-to-image run is evaluated on: an encoded caption set, seed s → caption s mod N.

An evaluation prompt set is a folder written by ``python -m tract_repro.encode_latents`` with the run's own model
folder (COCO 2014 validation for FID-30K and the CLIP score): its caption embeddings condition the samples,
its caption strings are what the CLIP score compares them with, and its images are the FID reference
(``python -m tract_repro.evaluation.fid reference latents --root FOLDER``).  Sample i comes from seed i and
caption row i mod N, so the same seeds give the same pairs in every evaluation, whatever the batching.
"""
from pathlib import Path

import numpy as np

from tract_repro.common.errors import ConfigError

TEXT_FILES = ("text_encoder/", "tokenizer/")


def _text_digests(manifest):
    return {k: v for k, v in manifest["files_sha256"].items() if k.startswith(TEXT_FILES)}


class Prompts:
    """Caption embeddings and strings of an encoded caption set, by seed."""

    def __init__(self, folder):
        from tract_repro.data.latents import LatentArrays

        self.data = LatentArrays(folder)
        if not self.data.text:
            raise ConfigError(f"--prompts {folder} holds no caption embeddings: encode captioned images (COCO 2014 "
                              f"validation's) with the run's model folder, python -m tract_repro.encode_latents "
                              f"--model MODEL --source SRC --out {folder}")
        self.folder = Path(folder)

    def __len__(self):
        return len(self.data)

    def rows(self, seeds):
        """Caption rows of ``seeds``: s mod N."""
        return np.asarray(list(seeds), dtype=np.int64) % len(self)

    def cond(self, seeds):
        """The :class:`Cond` of ``seeds`` (labels zero, ``extra["text"]`` the caption embeddings)."""
        return self.data.cond(self.rows(seeds))

    def captions(self, seeds):
        return self.data.captions(self.rows(seeds))

    def check_run(self, run):
        """One line if the run's training data were encoded by another text encoder than these prompts were."""
        data = getattr(run, "data", None)
        if data is None or not getattr(data, "text", False):
            raise ConfigError(f"{run.path} is not a text-conditioned latent run: --prompts is for text-to-image runs")
        ours, theirs = _text_digests(self.data.manifest), _text_digests(data.manifest)
        if ours != theirs:
            raise ConfigError(f"--prompts {self.folder} was encoded with the text encoder of {self.data.model}, not "
                              f"the one {run.path} trained with ({data.model}): encode the prompts with its model folder")

    def record(self, seeds=None):
        record = dict(folder=str(self.folder), captions=len(self), source=self.data.manifest["source"]["path"],
                      text_encoder_sha256=_text_digests(self.data.manifest),
                      rule="seed s -> caption row s mod N")
        if seeds is not None:
            record["wraps"] = bool(len(seeds) > len(self))
        return record


def for_run(run, folder):
    """The prompts a finished run samples with: ``Prompts(folder)`` checked against it; None for a run without text
    and no ``folder``; one line for a text-to-image run without one, or prompts for a run without text."""
    if folder is not None:
        prompts = Prompts(folder)
        prompts.check_run(run)
        return prompts
    if getattr(run.data, "text", False):
        raise ConfigError(f"{run.path} is a text-to-image run: give the captions to sample with, --prompts FOLDER (an "
                          f"encoded caption set, e.g. COCO 2014 validation encoded by python -m tract_repro.encode_latents)")
    return None
