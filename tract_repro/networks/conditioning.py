"""What a denoiser is conditioned on besides (x_t, λ): one :class:`Cond`, passed through whole.

Methods, samplers, the training loop and evaluation never look inside a Cond: they pass it to
every denoiser call and slice it (``cond[rows]``) where they call the denoiser on part of a batch.
Only the denoisers and networks read its fields.  A new conditioning input is a named per-sample
tensor in ``extra`` (the PD UNet embeds each name declared in its ``extra_conditions``, like the
time input); the plumbing between the data and the network stays as it is.

Defined in :mod:`tract_repro.common.conditioning` (data sets, a layer below, make a Cond too) and
re-exported here, where the networks and everything above import it.
"""
from tract_repro.common.conditioning import NULL_LABEL, Cond, as_cond

__all__ = ["NULL_LABEL", "Cond", "as_cond"]
