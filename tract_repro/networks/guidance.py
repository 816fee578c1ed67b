"""Classifier-free guidance behind the denoiser contract (Ho & Salimans 2022; method-spec §7).

x̂^w(x_t, c) = (1 + w)·x̂(x_t, c) − w·x̂(x_t, ∅): w = 0 is the plain conditional prediction and
w = −1 the unconditional one.  Libraries that write the guidance *scale* s (x̂_∅ + s·(x̂_c − x̂_∅):
Imagen, diffusers, FLUX) have s = 1 + w.  The guided denoiser is itself a denoiser, so every
sampler, method and evaluation uses it unchanged; w travels per sample in ``cond.extra['w']``.
"""
import torch
from torch import nn

from tract_repro.common.errors import ConfigError
from tract_repro.networks.conditioning import NULL_LABEL, Cond, as_cond


def guided(x_cond, x_uncond, w):
    """x̂^w = (1 + w)·x̂_c − w·x̂_∅ (method-spec §7), w broadcast per sample."""
    w = w.reshape((-1,) + (1,) * (x_cond.ndim - 1)).to(x_cond.dtype)
    return (1 + w) * x_cond - w * x_uncond


def takes_input(denoiser, name):
    """Whether ``denoiser``'s network embeds the extra input ``name`` (a w-conditioned student does)."""
    return name in getattr(getattr(denoiser, "net", None), "extra_conditions", ())


class GuidedDenoiser(nn.Module):
    """D^w(x_t, λ, cond) = (1 + w)·D(x_t, λ, c) − w·D(x_t, λ, ∅), both predictions from **one** call of D
    on the doubled batch [x_t; x_t] with labels [c; ∅].

    ``cond.extra['w']`` holds w per sample.  It goes on to D only if D's network takes a w input (the
    frozen copy of a stage-1 student, whose w branch is still zero, computes the teacher exactly).  Where w = 0
    for every sample, x̂^0 = x̂(x_t, c) and the ∅ half is not computed.
    """

    def __init__(self, denoiser):
        super().__init__()
        self.denoiser = denoiser

    def forward(self, x_t, logsnr, cond=None):
        cond = as_cond(cond)
        if cond.labels is None or "w" not in cond.extra:
            raise ConfigError("guidance needs class labels and a guidance weight w per sample: a guided run needs a "
                              "class-conditional data set and network")
        n, w = x_t.shape[0], cond.extra["w"]
        if not bool(w.any()):  # x̂^0 = x̂(x_t, c): the conditional half alone
            return self.denoiser(x_t, logsnr, Cond(cond.labels, {k: v for k, v in cond.extra.items()
                                                                  if k != "w" or takes_input(self.denoiser, "w")}))
        extra = {k: torch.cat([v, v]) for k, v in cond.extra.items() if k != "w" or takes_input(self.denoiser, "w")}
        both = Cond(torch.cat([cond.labels, torch.full_like(cond.labels, NULL_LABEL)]), extra)
        out = self.denoiser(torch.cat([x_t, x_t]), torch.cat([logsnr, logsnr]), both)
        return guided(out[:n], out[n:], w)
