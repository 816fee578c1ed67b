"""What a denoiser is conditioned on besides (x_t, λ): one :class:`Cond`, passed through whole.

Methods, samplers, the training loop and evaluation never look inside a Cond: they pass it to
every denoiser call and slice it (``cond[rows]``) where they call the denoiser on part of a batch.
Only the denoisers and networks read its fields.  A new conditioning input is a named per-sample
tensor in ``extra`` (the PD UNet embeds each name declared in its ``extra_conditions``, like the
time input; a latent data set's caption embeddings are ``extra["text"]``, (B, L, D)); the plumbing
between the data and the network stays as it is.

It lives in ``common`` because data sets (a layer below the networks) make it; the networks layer
re-exports it as :mod:`tract_repro.networks.conditioning`, where the rest of the package imports it.
"""
from dataclasses import dataclass, field
from typing import Mapping

import torch

#: The class label of the null class ∅ ("no class"): a teacher trained with label dropout predicts the
#: unconditional x̂(x_t, ∅) for it (method-spec §7).
NULL_LABEL = -1


@dataclass(frozen=True)
class Cond:
    """Per-sample conditioning: class ``labels`` (B,) or None, and named ``extra`` tensors, each (B, …)."""

    labels: torch.Tensor | None = None
    extra: Mapping[str, torch.Tensor] = field(default_factory=dict)

    def __getitem__(self, rows):
        """The conditioning of the samples ``rows`` (a mask, an index tensor or a slice)."""
        return Cond(None if self.labels is None else self.labels[rows], {k: v[rows] for k, v in self.extra.items()})

    def to(self, device):
        return Cond(None if self.labels is None else self.labels.to(device),
                    {k: v.to(device) for k, v in self.extra.items()})


def as_cond(cond):
    """A :class:`Cond` from a Cond, a tensor of class labels, or None (nothing)."""
    if isinstance(cond, Cond):
        return cond
    return Cond(labels=cond)
