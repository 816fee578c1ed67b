"""PyTorch port of the Google "Progressive Distillation" UNet, gin-configurable.

Module layout (stable names, for checkpoint import):

* ``time``: Sequential(Linear(C, E), SiLU, Linear(E, E)) on the sinusoidal
  embedding of u = arctan(exp(-logsnr / 2)) / (pi / 2) (t = 1000 u).
* ``class_emb``: Linear(num_classes, E) on one-hot labels (only if num_classes > 1); with
  ``null_class`` one more row, for the null class ∅ (label −1) of classifier-free guidance.
* ``cond_emb[name]``: Sequential(Linear(C, E), SiLU, Linear(E, E)) per extra scalar
  condition, on the sinusoidal embedding of 1000·value (as the time input's 1000·u; guidance's
  w ∈ [0, 4] spans four "timestep" units of 1000); all embeddings are summed.  The last layer
  starts at zero, so a network given a new input (a w-conditioned student initialised from its
  teacher) starts out computing exactly what it computed without it.
* ``conv_in``: 3x3 conv in_channels -> C (first entry of the skip stack).
* ``down[j]``: ``Block`` (``.res`` ResBlock, ``.attn`` SelfAttention or None), in
  order: per level, num_res_blocks blocks, then (all but the last level) one
  ``resample='down'`` block. Every output is pushed on the skip stack.
* ``mid[0]``: ResBlock + attention, ``mid[1]``: ResBlock.
* ``up[j]``: per level from the last to 0, num_res_blocks + 1 blocks on
  concat([h, skip.pop()]), then (all but level 0) one ``resample='up'`` block.
* ``out_norm`` (GroupNorm), SiLU, ``out_conv`` (3x3 conv C*mult[0] -> in_channels*num_outputs).

ResBlock params: norm1, conv1, time (Linear E -> 2*out), norm2, conv2, skip (1x1, if in != out).
SelfAttention params: norm, qkv (1x1 conv C -> 3C, per-head [q, k, v]), proj.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import gin
import torch
import torch.nn.functional as F
from torch import nn

from tract_repro.common.errors import ConfigError
from tract_repro.networks.conditioning import NULL_LABEL
from tract_repro.networks.layers import (
    ZERO_INIT_SCALE, Block, ResBlock, SelfAttention, conv, group_norm, linear,
    embedding_mlp, timestep_embedding,
)


@gin.configurable
class UNet(nn.Module):
    """Progressive-Distillation UNet: predicts (B, in_channels*num_outputs, H, W)
    from x (B, in_channels, H, W), logsnr (B,), optional labels and extra conditions."""

    def __init__(
        self,
        in_channels: int = 3,
        resolution: int = 32,
        channels: int = 256,
        emb_channels: int | None = None,
        channel_mult: Sequence[int] = (1, 1, 1),
        num_res_blocks: int = 3,
        attn_resolutions: Sequence[int] = (16, 8),
        attn_heads: int = 1,
        attn_head_dim: int | None = None,
        dropout: float = 0.0,
        num_outputs: int = 1,
        num_classes: int = 1,
        null_class: bool = False,
        norm_groups: int = 32,
        logsnr_input: str = "inv_cos",
        extra_conditions: Sequence[str] = (),
    ):
        init_kwargs = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        super().__init__()
        self.init_kwargs = init_kwargs  # the arguments that build this network again (the diffusers export's config)
        if logsnr_input != "inv_cos":
            raise ConfigError(f"logsnr_input={logsnr_input!r} not supported (only 'inv_cos')")
        self.in_channels = in_channels
        self.resolution = resolution
        self.channels = C = channels
        self.emb_channels = E = emb_channels if emb_channels is not None else 4 * channels
        self.num_classes = num_classes
        self.null_class = bool(null_class)
        if self.null_class and num_classes <= 1:
            raise ConfigError("UNet.null_class needs a class-conditional network: set UNet.num_classes to the number of classes")
        self.num_outputs = num_outputs
        self.extra_conditions = tuple(extra_conditions)
        attn_resolutions = tuple(attn_resolutions)
        groups = norm_groups

        def heads(ch: int) -> int:
            return ch // attn_head_dim if attn_head_dim else attn_heads

        def block(cin, cout, res, resample=None):
            attn = SelfAttention(cout, heads(cout), groups) if res in attn_resolutions and not resample else None
            return Block(ResBlock(cin, cout, E, resample, dropout, groups), attn)

        # Embeddings.
        self.time = embedding_mlp(C, E)
        self.class_emb = linear(num_classes + self.null_class, E) if num_classes > 1 else None
        self.cond_emb = nn.ModuleDict({n: embedding_mlp(C, E, last_scale=0.0) for n in self.extra_conditions})

        # Down path (skip_ch mirrors the skip stack).
        self.conv_in = conv(in_channels, C, 3)
        self.down = nn.ModuleList()
        skip_ch, ch, res = [C], C, resolution
        for i, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                self.down.append(block(ch, C * mult, res))
                ch = C * mult
                skip_ch.append(ch)
            if i != len(channel_mult) - 1:
                self.down.append(block(ch, ch, res, "down"))
                res //= 2
                skip_ch.append(ch)

        # Middle.
        self.mid = nn.ModuleList([
            Block(ResBlock(ch, ch, E, None, dropout, groups), SelfAttention(ch, heads(ch), groups)),
            Block(ResBlock(ch, ch, E, None, dropout, groups)),
        ])

        # Up path.
        self.up = nn.ModuleList()
        for i in reversed(range(len(channel_mult))):
            for _ in range(num_res_blocks + 1):
                self.up.append(block(ch + skip_ch.pop(), C * channel_mult[i], res))
                ch = C * channel_mult[i]
            if i != 0:
                self.up.append(block(ch, ch, res, "up"))
                res *= 2
        assert not skip_ch

        # Output head.
        self.out_norm = group_norm(ch, groups)
        self.out_conv = conv(ch, in_channels * num_outputs, 3, ZERO_INIT_SCALE)

    def embed(self, logsnr: torch.Tensor, labels: torch.Tensor | None = None,
              cond: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Conditioning embedding (B, E): time + class + extra conditions."""
        u = torch.arctan(torch.exp(-0.5 * logsnr.float().clamp(-20.0, 20.0))) / (0.5 * math.pi)
        emb = self.time(timestep_embedding(u, self.channels, max_time=1.0))
        if self.class_emb is not None:
            if labels is None:
                raise ConfigError(f"UNet has num_classes={self.num_classes}: labels are required")
            emb = emb + self.class_emb(self._one_hot(labels).to(emb.dtype))
        elif labels is not None:
            raise ConfigError("labels given to an unconditional UNet (num_classes=1)")
        cond = cond or {}
        unknown = set(cond) - set(self.extra_conditions)
        if unknown:
            raise ConfigError(f"unknown extra conditions {sorted(unknown)}; declared {self.extra_conditions}")
        for name in self.extra_conditions:
            if name not in cond:
                raise ConfigError(f"this network takes a {name!r} input that was not given: sample it with one "
                                  f"(e.g. evaluate --{name} ...)" if name == "w" else
                                  f"this network takes a {name!r} input that was not given")
            emb = emb + self.cond_emb[name](timestep_embedding(cond[name], self.channels, max_time=1.0))
        return emb

    def _one_hot(self, labels):
        """One-hot class labels; the null class ∅ (label −1) is the extra last row of a ``null_class`` network."""
        labels = labels.long()
        null = labels == NULL_LABEL
        if null.any():
            if not self.null_class:
                raise ConfigError("this UNet has no null class ∅ (it was not trained with label dropout): train the "
                                  "teacher with TeacherTraining.p_uncond = 0.1 and UNet.null_class = True")
            labels = torch.where(null, torch.full_like(labels, self.num_classes), labels)
        return F.one_hot(labels, self.num_classes + self.null_class)

    #: the gin setting that removes the w input (one-line errors name it)
    w_input_setting = "drop 'w' from UNet.extra_conditions"

    def fresh_prefixes(self, names):
        """Where the branches of the new inputs ``names`` are in this network's state dict: ``cond_emb.<name>.``."""
        return tuple(f"cond_emb.{name}." for name in names)

    def forward(self, x: torch.Tensor, logsnr: torch.Tensor, labels: torch.Tensor | None = None,
                cond: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        emb = self.embed(logsnr, labels, cond)
        h = self.conv_in(x)
        skips = [h]
        for blk in self.down:
            h = blk(h, emb)
            skips.append(h)
        for blk in self.mid:
            h = blk(h, emb)
        for blk in self.up:
            if blk.res.resample is None:
                h = torch.cat([h, skips.pop()], dim=1)
            h = blk(h, emb)
        return self.out_conv(F.silu(self.out_norm(h)))
