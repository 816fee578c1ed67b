"""Layers of NVIDIA EDM's networks, re-written from the spec (edm-notes §1).

Every class keeps EDM's parameter/buffer names and registration order so that the
state dicts of the released EDM pickles load by name:

* ``Linear``: ``weight`` [out, in], ``bias`` [out] (optional).
* ``Conv2d``: ``weight`` [out, in, k, k], ``bias`` [out] (both absent for kernel 0), and
  the FIR buffer ``resample_filter`` [1, 1, L, L] only when ``up`` or ``down`` is set.
* ``GroupNorm``: ``weight``, ``bias``; groups = min(32, C // 4).
* ``FourierEmbedding``: buffer ``freqs`` (random at construction, load it from a checkpoint).
* ``PositionalEmbedding``: no state.
* ``UNetBlock``: ``norm0, conv0, affine, norm1, conv1, [skip], [norm2, qkv, proj]``.

Weights (and the FIR filter) are cast to the input dtype at call time, so the layers
also run in fp16 when fed fp16 activations; attention logits/softmax stay fp32.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from tract_repro.common.errors import ConfigError


__all__ = [
    "weight_init", "fir_filter", "Linear", "Conv2d", "GroupNorm", "FourierEmbedding",
    "PositionalEmbedding", "attention_weights", "UNetBlock",
]


def weight_init(shape: Sequence[int], mode: str, fan_in: int, fan_out: int) -> torch.Tensor:
    """A fresh tensor in one of EDM's four init modes (edm-notes §1.1)."""
    if mode == "xavier_uniform":
        return math.sqrt(6.0 / (fan_in + fan_out)) * (torch.rand(*shape) * 2 - 1)
    if mode == "xavier_normal":
        return math.sqrt(2.0 / (fan_in + fan_out)) * torch.randn(*shape)
    if mode == "kaiming_uniform":
        return math.sqrt(3.0 / fan_in) * (torch.rand(*shape) * 2 - 1)
    if mode == "kaiming_normal":
        return math.sqrt(1.0 / fan_in) * torch.randn(*shape)
    raise ConfigError(f"unknown init mode {mode!r}")


def fir_filter(taps: Sequence[float]) -> torch.Tensor:
    """The separable FIR filter (r ⊗ r) / (Σr)², shaped [1, 1, L, L]."""
    r = torch.as_tensor([float(t) for t in taps], dtype=torch.float32)
    f = torch.outer(r, r) / r.sum().square()
    return f.reshape(1, 1, len(taps), len(taps))


class Linear(nn.Module):
    """y = x Wᵀ + b, W [out, in]."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 init_mode: str = "kaiming_normal", init_weight: float = 1.0, init_bias: float = 0.0):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        fans = dict(mode=init_mode, fan_in=in_features, fan_out=out_features)
        self.weight = nn.Parameter(weight_init([out_features, in_features], **fans) * init_weight)
        self.bias = nn.Parameter(weight_init([out_features], **fans) * init_bias) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x @ self.weight.to(x.dtype).t()
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y


class Conv2d(nn.Module):
    """3×3/1×1 convolution with optional FIR up/down resampling (edm-notes §1.2).

    ``kernel = 0`` gives a parameter-free resampler.  Non-fused down: depthwise FIR
    (stride 2, pad (L-1)//2) then the convolution; non-fused up: depthwise transposed FIR
    with 4f then the convolution.  Fused down (NCSN++ ``aux_residual``): convolution with
    padding k//2 + (L-1)//2, then depthwise FIR stride 2 without padding.  Fused up is
    unused by the two teachers and not implemented.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: int, bias: bool = True,
                 up: bool = False, down: bool = False, resample_filter: Sequence[float] = (1, 1),
                 fused_resample: bool = False, init_mode: str = "kaiming_normal",
                 init_weight: float = 1.0, init_bias: float = 0.0):
        if up and down:
            raise ConfigError("Conv2d: up and down are exclusive")
        if fused_resample and up:
            raise ConfigError("Conv2d: fused up-sampling is not supported (no released EDM teacher uses it); set fused_resample=False")
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel = kernel
        self.up = up
        self.down = down
        self.fused_resample = fused_resample
        fans = dict(mode=init_mode, fan_in=in_channels * kernel * kernel,
                    fan_out=out_channels * kernel * kernel)
        self.weight = (nn.Parameter(weight_init([out_channels, in_channels, kernel, kernel], **fans)
                                    * init_weight) if kernel else None)
        self.bias = (nn.Parameter(weight_init([out_channels], **fans) * init_bias)
                     if kernel and bias else None)
        self.register_buffer("resample_filter", fir_filter(resample_filter) if (up or down) else None)

    def _fir(self, channels: int, dtype: torch.dtype) -> torch.Tensor:
        return self.resample_filter.to(dtype).repeat(channels, 1, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.to(x.dtype) if self.weight is not None else None
        w_pad = self.kernel // 2
        f_pad = (self.resample_filter.shape[-1] - 1) // 2 if self.resample_filter is not None else 0
        if self.fused_resample and self.down and w is not None:
            x = F.conv2d(x, w, padding=w_pad + f_pad)
            x = F.conv2d(x, self._fir(self.out_channels, x.dtype), stride=2, groups=self.out_channels)
        else:
            if self.up:
                x = F.conv_transpose2d(x, self._fir(self.in_channels, x.dtype) * 4, stride=2,
                                       padding=f_pad, groups=self.in_channels)
            if self.down:
                x = F.conv2d(x, self._fir(self.in_channels, x.dtype), stride=2, padding=f_pad,
                             groups=self.in_channels)
            if w is not None:
                x = F.conv2d(x, w, padding=w_pad)
        if self.bias is not None:
            x = x + self.bias.to(x.dtype).reshape(1, -1, 1, 1)
        return x


class GroupNorm(nn.Module):
    """GroupNorm with groups = min(num_groups, C // min_channels_per_group)."""

    def __init__(self, num_channels: int, num_groups: int = 32, min_channels_per_group: int = 4,
                 eps: float = 1e-5):
        super().__init__()
        self.num_channels = num_channels
        self.num_groups = max(1, min(num_groups, num_channels // min_channels_per_group))
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(x, self.num_groups, self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps)


class FourierEmbedding(nn.Module):
    """[cos(2π f c), sin(2π f c)] with f ~ N(0, scale²) drawn once (buffer ``freqs``)."""

    def __init__(self, num_channels: int, scale: float = 16.0):
        super().__init__()
        self.num_channels = num_channels
        self.register_buffer("freqs", torch.randn(num_channels // 2) * scale)

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        arg = torch.outer(c, (2 * math.pi * self.freqs).to(c.dtype))
        return torch.cat([arg.cos(), arg.sin()], dim=1)


class PositionalEmbedding(nn.Module):
    """[cos(c f), sin(c f)], f_i = (1/max_positions)^(i / (h - [endpoint])), h = C/2."""

    def __init__(self, num_channels: int, max_positions: int = 10000, endpoint: bool = False):
        super().__init__()
        self.num_channels = num_channels
        self.max_positions = max_positions
        self.endpoint = endpoint

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        half = self.num_channels // 2
        i = torch.arange(half, dtype=torch.float32, device=c.device)
        freqs = (1.0 / self.max_positions) ** (i / (half - (1 if self.endpoint else 0)))
        arg = torch.outer(c, freqs.to(c.dtype))
        return torch.cat([arg.cos(), arg.sin()], dim=1)


def attention_weights(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """softmax_key(qᵀk / √c) in fp32, q, k [N, c, L] → [N, L_query, L_key] in q's dtype."""
    scale = 1.0 / math.sqrt(k.shape[1])
    logits = torch.einsum("ncq,nck->nqk", q.float(), k.float() * scale)
    return logits.softmax(dim=2).to(q.dtype)


class UNetBlock(nn.Module):
    """EDM's residual block with optional up/down sampling and self-attention (edm-notes §1.3).

    ``fused_attention`` (set by ``EDMNet.fused_attention``): attention through
    ``F.scaled_dot_product_attention`` instead of EDM's explicit softmax(qᵀk/√c)·v, equal to float tolerance.
    """

    fused_attention = False

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, up: bool = False,
                 down: bool = False, attention: bool = False, num_heads: int | None = None,
                 channels_per_head: int = 64, dropout: float = 0.0, skip_scale: float = 1.0,
                 eps: float = 1e-5, resample_filter: Sequence[float] = (1, 1),
                 resample_proj: bool = False, adaptive_scale: bool = True,
                 init: Mapping | None = None, init_zero: Mapping | None = None,
                 init_attn: Mapping | None = None):
        super().__init__()
        init = dict(init or {})
        init_zero = dict(init_zero) if init_zero is not None else dict(init_weight=0.0)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.emb_channels = emb_channels
        self.num_heads = (0 if not attention
                          else num_heads if num_heads is not None
                          else out_channels // channels_per_head)
        self.dropout = dropout
        self.skip_scale = skip_scale
        self.adaptive_scale = adaptive_scale

        self.norm0 = GroupNorm(in_channels, eps=eps)
        self.conv0 = Conv2d(in_channels, out_channels, kernel=3, up=up, down=down,
                            resample_filter=resample_filter, **init)
        self.affine = Linear(emb_channels, out_channels * (2 if adaptive_scale else 1), **init)
        self.norm1 = GroupNorm(out_channels, eps=eps)
        self.conv1 = Conv2d(out_channels, out_channels, kernel=3, **init_zero)
        self.skip = None
        if out_channels != in_channels or up or down:
            kernel = 1 if (resample_proj or out_channels != in_channels) else 0
            self.skip = Conv2d(in_channels, out_channels, kernel=kernel, up=up, down=down,
                               resample_filter=resample_filter, **init)
        if self.num_heads:
            self.norm2 = GroupNorm(out_channels, eps=eps)
            self.qkv = Conv2d(out_channels, out_channels * 3, kernel=1,
                              **(dict(init_attn) if init_attn is not None else init))
            self.proj = Conv2d(out_channels, out_channels, kernel=1, **init_zero)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        orig = x
        h = self.conv0(F.silu(self.norm0(x)))
        p = self.affine(emb).unsqueeze(2).unsqueeze(3).to(h.dtype)
        if self.adaptive_scale:
            scale, shift = p.chunk(2, dim=1)
            h = F.silu(shift + self.norm1(h) * (scale + 1))
        else:
            h = F.silu(self.norm1(h + p))
        h = self.conv1(F.dropout(h, p=self.dropout, training=self.training))
        h = (h + (self.skip(orig) if self.skip is not None else orig)) * self.skip_scale

        if self.num_heads:
            B, C, H, W = h.shape
            # qkv channel index = head·(3C/heads) + c·3 + j, j = 0/1/2 for q/k/v.
            t = self.qkv(self.norm2(h)).reshape(B * self.num_heads, C // self.num_heads, 3, H * W)
            q, k, v = t.unbind(2)
            if self.fused_attention:  # PyTorch's fused kernel, in fp32 like EDM's logits
                a = F.scaled_dot_product_attention(*(u.float().transpose(1, 2) for u in (q, k, v)))
                a = a.transpose(1, 2).to(q.dtype).reshape(B, C, H, W)
            else:
                w = attention_weights(q, k)
                a = torch.einsum("nqk,nck->ncq", w, v).reshape(B, C, H, W)
            h = (self.proj(a) + h) * self.skip_scale
        return h
