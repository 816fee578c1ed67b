"""Building blocks of the Progressive-Distillation UNet (PyTorch port).

Initialisation follows the official JAX code: variance scaling, ``fan_avg``,
uniform (= Xavier uniform) with scale 1 for every conv / linear, zero biases,
and scale 1e-10 ("zero init", *not* exactly zero) for the layers that end a
residual branch.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from tract_repro.common.errors import ConfigError


ZERO_INIT_SCALE = 1e-10


def init_(layer: nn.Module, scale: float = 1.0) -> nn.Module:
    """Variance-scaling(scale, fan_avg, uniform) weights and zero bias, in place."""
    nn.init.xavier_uniform_(layer.weight, gain=math.sqrt(scale))
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)
    return layer


def conv(cin: int, cout: int, k: int, scale: float = 1.0) -> nn.Conv2d:
    """k x k 'same' convolution with the official init."""
    return init_(nn.Conv2d(cin, cout, k, padding=k // 2), scale)


def linear(cin: int, cout: int, scale: float = 1.0) -> nn.Linear:
    """Dense layer with the official init."""
    return init_(nn.Linear(cin, cout), scale)


def group_norm(ch: int, groups: int) -> nn.GroupNorm:
    """GroupNorm(eps=1e-5) with gcd(groups, ch) groups, so tiny nets also work."""
    return nn.GroupNorm(math.gcd(groups, ch), ch, eps=1e-5)


def timestep_embedding(t: torch.Tensor, dim: int, max_time: float = 1000.0) -> torch.Tensor:
    """Sinusoidal embedding [sin(t' f), cos(t' f)], t' = t * 1000 / max_time,
    f_k = exp(-k ln(10000) / (dim/2 - 1)). Returns (B, dim) float32."""
    t = t.float() * (1000.0 / max_time)
    half = dim // 2
    k = torch.arange(half, device=t.device, dtype=torch.float32)
    freqs = torch.exp(-k * (math.log(10000.0) / (half - 1)))
    args = t[:, None] * freqs[None]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class ResBlock(nn.Module):
    """Residual block with FiLM (scale, shift) conditioning on the embedding.

    h = conv1(resample(SiLU(norm1(x)))); h = (1 + s) * norm2(h) + b with
    (s, b) = time(SiLU(emb)); h = conv2(Dropout(SiLU(h))); out = h + skip(resample(x)).
    """

    def __init__(self, cin: int, cout: int, emb_ch: int, resample: str | None = None,
                 dropout: float = 0.0, norm_groups: int = 32):
        super().__init__()
        if resample not in (None, "down", "up"):
            raise ConfigError(f"resample must be None, 'down' or 'up', got {resample!r}")
        self.resample = resample
        self.norm1 = group_norm(cin, norm_groups)
        self.conv1 = conv(cin, cout, 3)
        self.time = linear(emb_ch, 2 * cout, ZERO_INIT_SCALE)
        self.norm2 = group_norm(cout, norm_groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = conv(cout, cout, 3, ZERO_INIT_SCALE)
        self.skip = conv(cin, cout, 1) if cin != cout else None

    def _resample(self, x: torch.Tensor) -> torch.Tensor:
        if self.resample == "down":
            return F.avg_pool2d(x, 2)
        if self.resample == "up":
            return F.interpolate(x, scale_factor=2.0, mode="nearest")
        return x

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.norm1(x))
        h, x = self._resample(h), self._resample(x)
        h = self.conv1(h)
        scale, shift = self.time(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
        h = (1.0 + scale) * self.norm2(h) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return h + (self.skip(x) if self.skip is not None else x)


class SelfAttention(nn.Module):
    """Multi-head spatial self-attention with residual connection.

    qkv is a 1x1 conv C -> 3C whose output is viewed as (B, heads, 3*hd, HW):
    per head the channels are laid out [q(hd), k(hd), v(hd)].
    """

    def __init__(self, ch: int, heads: int = 1, norm_groups: int = 32):
        super().__init__()
        if ch % heads:
            raise ConfigError(f"{ch} channels not divisible into {heads} heads")
        self.heads = heads
        self.norm = group_norm(ch, norm_groups)
        self.qkv = conv(ch, 3 * ch, 1)
        self.proj = conv(ch, ch, 1, ZERO_INIT_SCALE)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, hh, ww = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, self.heads, 3 * c // self.heads, hh * ww)
        q, k, v = qkv.transpose(-1, -2).chunk(3, dim=-1)  # each (B, heads, HW, hd)
        h = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(hd)) v
        h = h.transpose(-1, -2).reshape(b, c, hh, ww)
        return x + self.proj(h)


class Block(nn.Module):
    """One entry of the down / mid / up lists: a ResBlock, optionally followed by attention."""

    def __init__(self, res: ResBlock, attn: SelfAttention | None = None):
        super().__init__()
        self.res = res
        self.attn = attn

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.res(x, emb)
        return self.attn(h) if self.attn is not None else h


def embedding_mlp(ch: int, emb_ch: int, last_scale: float = 1.0) -> nn.Sequential:
    """Linear(ch, E), SiLU, Linear(E, E) on sinusoidal features; ``last_scale`` 0 makes a branch that starts at zero."""
    return nn.Sequential(linear(ch, emb_ch), nn.SiLU(), linear(emb_ch, emb_ch, last_scale))
