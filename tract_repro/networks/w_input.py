"""The guidance-weight input w of a diffusers network (guided distillation's student), added at zero.

A UNet2DConditionModel is rebuilt with diffusers' own ``time_cond_proj_dim``: ``time_embedding.cond_proj``
(Linear(D, C), no bias) adds e(w) (:func:`guidance_embedding`, the latent consistency pipelines' embedding) to the
timestep features.  A class-conditional DiT gets the same branch on each ``CombinedTimestepLabelEmbeddings`` (every
block's ``norm1.emb``; the output head reuses block 0's), e(w) riding with the labels (:class:`GuidedLabels`).  Both
branches start at zero, so the student computes its teacher exactly at every w.
"""
import functools
import math

import torch
from torch import nn

from tract_repro.common.errors import ConfigError

#: the diffusers classes that can take w (those :mod:`tract_repro.networks.diffusers_net` wraps)
W_MODELS = ("UNet2DConditionModel", "DiTTransformer2DModel", "Transformer2DModel")


def guidance_embedding(w, dim):
    """e(w) = [sin(1000·w·f_k), cos(1000·w·f_k)]_{k<h}, f_k = 10000^(−k/(h−1)), h = ⌊dim/2⌋, zero-padded to dim."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32, device=w.device) * (-math.log(10000.0) / (half - 1)))
    angles = (1000.0 * w).float()[:, None] * freqs[None, :]
    return nn.functional.pad(torch.cat([angles.sin(), angles.cos()], dim=1), (0, dim % 2))


class GuidedLabels:
    """A DiT's class labels (B,) with the guidance embedding e(w) (B, D) of the same call: what the DiT's patched
    timestep-label embeddings take as ``class_labels``.  diffusers passes class_labels through untouched to every
    block and to the output head (and gradient checkpointing keeps it for the recomputation), so w is per call."""

    def __init__(self, labels, embedding):
        self.labels, self.embedding = labels, embedding


@functools.cache
def guided_embedding_class():
    """diffusers' CombinedTimestepLabelEmbeddings with a guidance-weight branch ``cond_proj`` (class made once)."""
    from diffusers.models.embeddings import CombinedTimestepLabelEmbeddings

    class GuidedTimestepLabelEmbeddings(CombinedTimestepLabelEmbeddings):
        """timestep_embedder(time_proj(t) + cond_proj(e(w))) + class_embedder(labels), with ``class_labels`` a
        :class:`GuidedLabels`; otherwise diffusers' forward (cond_proj at zero: the same numbers)."""

        def forward(self, timestep, class_labels, hidden_dtype=None):
            if not isinstance(class_labels, GuidedLabels):
                raise ConfigError("this DiT takes a guidance weight w (diffusers_network.time_cond_proj_dim) that "
                                  "was not given: call it through its DiffusersNet with cond['w']")
            timesteps_proj = self.time_proj(timestep)
            branch = self.cond_proj(class_labels.embedding.to(self.cond_proj.weight.dtype))
            timesteps_proj = timesteps_proj + branch.to(timesteps_proj.dtype)
            timesteps_emb = self.timestep_embedder(timesteps_proj.to(dtype=hidden_dtype))  # (N, D)
            return timesteps_emb + self.class_embedder(class_labels.labels)  # (N, D)

    GuidedTimestepLabelEmbeddings.__module__ = __name__
    return GuidedTimestepLabelEmbeddings


def guided_embeddings(model):
    """[(name, module)] of ``model``'s timestep-label embeddings that take w (a DiT given the w input), in order."""
    cls = guided_embedding_class()
    return [(name, m) for name, m in model.named_modules() if isinstance(m, cls)]


def add_dit_w_input(model, dim, where):
    """``model`` (a DiT, changed in place) with a zero ``cond_proj`` = Linear(dim, C, bias=False) on each of its
    CombinedTimestepLabelEmbeddings (C the width of its time_proj features) and their forward taking e(w)."""
    from diffusers.models.embeddings import CombinedTimestepLabelEmbeddings

    if guided_embeddings(model):
        raise ConfigError(f"{where} already takes w: leave diffusers_network.time_cond_proj_dim unset")
    found = [m for m in model.modules() if isinstance(m, CombinedTimestepLabelEmbeddings)]
    if not found:
        raise ConfigError(f"{where} has no CombinedTimestepLabelEmbeddings (a class-conditional DiT's timestep-label "
                          f"embedding) to give a w input: leave diffusers_network.time_cond_proj_dim unset")
    cls = guided_embedding_class()
    for module in found:
        weight = module.timestep_embedder.linear_1.weight
        proj = nn.Linear(dim, module.timestep_embedder.linear_1.in_features, bias=False,
                         device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            proj.weight.zero_()
        module.__class__ = cls
        module.cond_proj = proj.train(module.training)
    return model


def with_w_input(model, dim, where):
    """``model`` with a guidance-weight input and its own weights, computing what ``model`` computes at every w:
    a UNet rebuilt with diffusers' ``time_cond_proj_dim`` = dim (its new ``time_embedding.cond_proj`` zero), a DiT
    given zero ``cond_proj`` branches in place (:func:`add_dit_w_input`)."""
    name = type(model).__name__
    if name not in W_MODELS:
        raise ConfigError(f"diffusers_network.time_cond_proj_dim gives a {' or '.join(W_MODELS)} a w input, but "
                          f"{where} is a {name}: leave it unset")
    if name == "UNet2DConditionModel" and model.config.get("time_cond_proj_dim") is not None:
        raise ConfigError(f"{where} already takes w (time_cond_proj_dim = {model.config.time_cond_proj_dim}): leave "
                          f"diffusers_network.time_cond_proj_dim unset")
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 4:
        raise ConfigError(f"diffusers_network.time_cond_proj_dim = {dim!r}: give the width of w's embedding, an "
                          f"integer ≥ 4 (the latent consistency models' 256)")
    if name != "UNet2DConditionModel":
        if model.config.get("norm_type") != "ada_norm_zero" or not model.config.get("num_embeds_ada_norm"):
            raise ConfigError(f"diffusers_network.time_cond_proj_dim gives a class-conditional DiT (norm_type "
                              f"'ada_norm_zero') a w input, but {where} has norm_type "
                              f"{model.config.get('norm_type')!r}: leave it unset")
        return add_dit_w_input(model, dim, where)
    # without diffusers' private keys: `_use_default_values` would reset time_cond_proj_dim to its default, None
    new = type(model).from_config({**{k: v for k, v in model.config.items() if not k.startswith("_")},
                                   "time_cond_proj_dim": dim})
    missing, unexpected = new.load_state_dict(model.state_dict(), strict=False)
    assert list(missing) == ["time_embedding.cond_proj.weight"] and not unexpected, (missing, unexpected)
    with torch.no_grad():
        new.time_embedding.cond_proj.weight.zero_()
    return new.train(model.training)
