"""NVIDIA EDM's two teacher networks, re-written from the spec (edm-notes §§1-4, 7).

* ``SongUNet``: NCSN++ / DDPM++ (``--arch=ncsnpp`` for ``edm-cifar10-32x32-uncond-ve``).
* ``DhariwalUNet``: ADM (``--arch=adm`` for ``edm-imagenet-64x64-cond-adm``).
* ``EDMNet``: holds either as ``model`` so state-dict keys read ``model.…`` exactly as in
  the released pickles (EDMPrecond has no tensors of its own).  It returns the raw
  network output F; EDM's preconditioning lives in a separate denoiser.

Both nets take ``forward(x, noise_labels, class_labels=None, augment_labels=None)`` with
``noise_labels`` of shape (B,) (or (1,), broadcast over the batch) and float one-hot
``class_labels`` (B, label_dim).

Module names follow EDM: ``map_noise, [map_label], [map_augment], map_layer0, map_layer1``
(Song) / ``map_noise, [map_augment], map_layer0, map_layer1, [map_label]`` (ADM), then the
``ModuleDict``s ``enc`` and ``dec`` keyed ``<R>x<R>_<name>``, then (ADM) ``out_norm``,
``out_conv``.  Every submodule is registered in EDM's order, so ``state_dict()`` lists
the keys in the order of the released checkpoints.
"""
from __future__ import annotations

import math
from typing import Sequence

import gin
import torch
import torch.nn.functional as F
from torch import nn

from tract_repro.common.errors import ConfigError
from tract_repro.networks.layers import embedding_mlp, timestep_embedding
from tract_repro.networks.edm_layers import (
    Conv2d, FourierEmbedding, GroupNorm, Linear, PositionalEmbedding, UNetBlock,
)

__all__ = [
    "SongUNet", "DhariwalUNet", "EDMNet", "edm_cifar10_ve", "edm_imagenet64_adm", "edm_digits_tiny",
    "CIFAR10_VE_KWARGS", "IMAGENET64_ADM_KWARGS", "DIGITS_TINY_KWARGS",
]


def _drop_labels(labels: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Classifier-free-guidance label dropout (training only): zero whole label rows."""
    if not (training and p):
        return labels
    keep = torch.rand([labels.shape[0], 1], device=labels.device) >= p
    return labels * keep.to(labels.dtype)


def build_decoder(ch, skip_channels, channel_mult, model_channels, num_blocks, img_resolution, block_kw, attends):
    """EDM's decoder layout, shared by SongUNet and DhariwalUNet (edm-notes §2.4, §3).

    From the lowest resolution up: ``in0`` (attention) and ``in1`` at the last level, else an
    ``up`` block; then ``num_blocks + 1`` blocks, each taking [x, skip] with the skips popped
    last-in first-out.  ``attends(idx, res)`` says which of those blocks has attention.
    Returns the ModuleDict and the output channel count.
    """
    dec, pending, last = nn.ModuleDict(), list(skip_channels), len(channel_mult) - 1
    for level in reversed(range(len(channel_mult))):
        res = img_resolution >> level
        if level == last:
            dec[f"{res}x{res}_in0"] = UNetBlock(ch, ch, attention=True, **block_kw)
            dec[f"{res}x{res}_in1"] = UNetBlock(ch, ch, **block_kw)
        else:
            dec[f"{res}x{res}_up"] = UNetBlock(ch, ch, up=True, **block_kw)
        for idx in range(num_blocks + 1):
            out = model_channels * channel_mult[level]
            dec[f"{res}x{res}_block{idx}"] = UNetBlock(ch + pending.pop(), out, attention=attends(idx, res), **block_kw)
            ch = out
    assert not pending
    return dec, ch


@gin.configurable
class SongUNet(nn.Module):
    """EDM's SongUNet (NCSN++ with embedding 'fourier', encoder 'residual'; DDPM++ with
    'positional' / 'standard').  Only decoder_type 'standard' and encoder_type
    'standard'/'residual' are implemented (all the EDM teachers use)."""

    def __init__(
        self,
        img_resolution: int,
        in_channels: int,
        out_channels: int,
        label_dim: int = 0,
        augment_dim: int = 0,
        model_channels: int = 128,
        channel_mult: Sequence[int] = (1, 2, 2, 2),
        channel_mult_emb: int = 4,
        num_blocks: int = 4,
        attn_resolutions: Sequence[int] = (16,),
        dropout: float = 0.10,
        label_dropout: float = 0.0,
        embedding_type: str = "positional",
        channel_mult_noise: int = 1,
        encoder_type: str = "standard",
        decoder_type: str = "standard",
        resample_filter: Sequence[int] = (1, 1),
    ):
        if embedding_type not in ("fourier", "positional"):
            raise ConfigError(f"embedding_type {embedding_type!r}")
        if encoder_type not in ("standard", "residual"):
            raise ConfigError(f"SongUNet encoder_type {encoder_type!r} is not supported: use 'standard' or 'residual' (the released checkpoints')")
        if decoder_type != "standard":
            raise ConfigError(f"SongUNet decoder_type {decoder_type!r} is not supported: use 'standard' (the released checkpoints')")
        super().__init__()
        self.img_resolution = img_resolution
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.label_dim = label_dim
        self.augment_dim = augment_dim
        self.label_dropout = label_dropout
        self.encoder_type = encoder_type
        self.decoder_type = decoder_type
        resample_filter = list(resample_filter)
        attn_resolutions = set(attn_resolutions)

        emb_ch = model_channels * channel_mult_emb
        noise_ch = model_channels * channel_mult_noise
        init = dict(init_mode="xavier_uniform")
        init_zero = dict(init_mode="xavier_uniform", init_weight=1e-5)
        init_attn = dict(init_mode="xavier_uniform", init_weight=math.sqrt(0.2))
        block_kw = dict(emb_channels=emb_ch, num_heads=1, dropout=dropout, skip_scale=math.sqrt(0.5),
                        eps=1e-6, resample_filter=resample_filter, resample_proj=True,
                        adaptive_scale=False, init=init, init_zero=init_zero, init_attn=init_attn)

        # Mapping network.
        self.map_noise = (FourierEmbedding(noise_ch) if embedding_type == "fourier"
                          else PositionalEmbedding(noise_ch, endpoint=True))
        self.map_label = Linear(label_dim, noise_ch, **init) if label_dim else None
        self.map_augment = Linear(augment_dim, noise_ch, bias=False, **init) if augment_dim else None
        self.map_layer0 = Linear(noise_ch, emb_ch, **init)
        self.map_layer1 = Linear(emb_ch, emb_ch, **init)

        # Encoder.
        self.enc = nn.ModuleDict()
        skip_ch = []                      # channels of the skips, in push order
        ch = in_channels
        aux_ch = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                self.enc[f"{res}x{res}_conv"] = Conv2d(ch, model_channels, kernel=3, **init)
                ch = model_channels
                skip_ch.append(ch)
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(ch, ch, down=True, **block_kw)
                skip_ch.append(ch)
                if encoder_type == "residual":
                    self.enc[f"{res}x{res}_aux_residual"] = Conv2d(
                        aux_ch, ch, kernel=3, down=True, resample_filter=resample_filter,
                        fused_resample=True, **init)
                    aux_ch = ch
            for idx in range(num_blocks):
                out = model_channels * mult
                self.enc[f"{res}x{res}_block{idx}"] = UNetBlock(
                    ch, out, attention=res in attn_resolutions, **block_kw)
                ch = out
                skip_ch.append(ch)
        self.skip_channels = tuple(skip_ch)

        # Decoder: attention only in the last block of an attention resolution; aux output at 32×32.
        self.dec, ch = build_decoder(ch, skip_ch, channel_mult, model_channels, num_blocks, img_resolution, block_kw,
                                     attends=lambda idx, res: idx == num_blocks and res in attn_resolutions)
        self.dec[f"{img_resolution}x{img_resolution}_aux_norm"] = GroupNorm(ch, eps=1e-6)  # level 0 comes last
        self.dec[f"{img_resolution}x{img_resolution}_aux_conv"] = Conv2d(ch, out_channels, kernel=3, **init_zero)

    #: where an extra conditioning embedding (EDMNet.extra_conditions) joins: beside the class label
    extra_width = property(lambda self: self.map_layer0.in_features)

    def embed(self, noise_labels, class_labels=None, augment_labels=None, extra_emb=None) -> torch.Tensor:
        emb = self.map_noise(noise_labels.reshape(-1))
        emb = emb.reshape(emb.shape[0], 2, -1).flip(1).reshape(emb.shape)   # [cos|sin] → [sin|cos]
        if self.map_label is not None:
            if class_labels is None:
                raise ConfigError(f"SongUNet has label_dim={self.label_dim}: class_labels are required")
            labels = _drop_labels(class_labels.to(emb.dtype), self.label_dropout, self.training)
            emb = emb + self.map_label(labels * math.sqrt(self.map_label.in_features))
        if extra_emb is not None:
            emb = emb + extra_emb
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels.to(emb.dtype))
        emb = F.silu(self.map_layer0(emb))
        return F.silu(self.map_layer1(emb))

    def encode(self, x: torch.Tensor, emb: torch.Tensor):
        """Run the encoder; returns (x, skips) with the skips in push order."""
        skips = []
        aux = x
        for name, module in self.enc.items():
            if "aux_residual" in name:
                # Residual merge replaces the skip just pushed by the `down` block.
                x = (x + module(aux)) / math.sqrt(2)
                skips[-1] = aux = x
            else:
                x = module(x, emb) if isinstance(module, UNetBlock) else module(x)
                skips.append(x)
        return x, skips

    def decode(self, x: torch.Tensor, skips: list, emb: torch.Tensor) -> torch.Tensor:
        skips = list(skips)
        tmp = None
        out = None
        for name, module in self.dec.items():
            if name.endswith("_aux_norm"):
                tmp = module(x)
            elif name.endswith("_aux_conv"):
                tmp = module(F.silu(tmp))
                out = tmp if out is None else out + tmp
            else:
                if x.shape[1] != module.in_channels:
                    x = torch.cat([x, skips.pop()], dim=1)      # [x, skip]
                x = module(x, emb)
        assert not skips
        return out

    def forward(self, x, noise_labels, class_labels=None, augment_labels=None) -> torch.Tensor:
        emb = self.embed(noise_labels, class_labels, augment_labels)
        x, skips = self.encode(x, emb)
        return self.decode(x, skips, emb)


@gin.configurable
class DhariwalUNet(nn.Module):
    """EDM's DhariwalUNet (ADM, Dhariwal & Nichol 2021)."""

    def __init__(
        self,
        img_resolution: int,
        in_channels: int,
        out_channels: int,
        label_dim: int = 0,
        augment_dim: int = 0,
        model_channels: int = 192,
        channel_mult: Sequence[int] = (1, 2, 3, 4),
        channel_mult_emb: int = 4,
        num_blocks: int = 3,
        attn_resolutions: Sequence[int] = (32, 16, 8),
        dropout: float = 0.10,
        label_dropout: float = 0.0,
    ):
        super().__init__()
        self.img_resolution = img_resolution
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.label_dim = label_dim
        self.augment_dim = augment_dim
        self.label_dropout = label_dropout
        attn_resolutions = set(attn_resolutions)

        emb_ch = model_channels * channel_mult_emb
        init = dict(init_mode="kaiming_uniform", init_weight=math.sqrt(1 / 3), init_bias=math.sqrt(1 / 3))
        init_zero = dict(init_mode="kaiming_uniform", init_weight=0.0, init_bias=0.0)
        block_kw = dict(emb_channels=emb_ch, channels_per_head=64, dropout=dropout, skip_scale=1.0,
                        eps=1e-5, resample_filter=[1, 1], resample_proj=False, adaptive_scale=True,
                        init=init, init_zero=init_zero, init_attn=None)

        # Mapping network.
        self.map_noise = PositionalEmbedding(model_channels, endpoint=False)
        self.map_augment = (Linear(augment_dim, model_channels, bias=False, **init_zero)
                            if augment_dim else None)
        self.map_layer0 = Linear(model_channels, emb_ch, **init)
        self.map_layer1 = Linear(emb_ch, emb_ch, **init)
        self.map_label = (Linear(label_dim, emb_ch, bias=False, init_mode="kaiming_normal",
                                 init_weight=math.sqrt(label_dim)) if label_dim else None)

        # Encoder: every module's output is a skip.
        self.enc = nn.ModuleDict()
        skip_ch = []
        ch = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                self.enc[f"{res}x{res}_conv"] = Conv2d(ch, model_channels * mult, kernel=3, **init)
                ch = model_channels * mult
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(ch, ch, down=True, **block_kw)
            skip_ch.append(ch)
            for idx in range(num_blocks):
                out = model_channels * mult
                self.enc[f"{res}x{res}_block{idx}"] = UNetBlock(
                    ch, out, attention=res in attn_resolutions, **block_kw)
                ch = out
                skip_ch.append(ch)
        self.skip_channels = tuple(skip_ch)

        # Decoder: attention in every block at an attention resolution.
        self.dec, ch = build_decoder(ch, skip_ch, channel_mult, model_channels, num_blocks, img_resolution, block_kw,
                                     attends=lambda idx, res: res in attn_resolutions)
        self.out_norm = GroupNorm(ch, eps=1e-5)
        self.out_conv = Conv2d(ch, out_channels, kernel=3, **init_zero)

    #: where an extra conditioning embedding (EDMNet.extra_conditions) joins: beside the class label
    extra_width = property(lambda self: self.map_layer1.out_features)

    def embed(self, noise_labels, class_labels=None, augment_labels=None, extra_emb=None) -> torch.Tensor:
        emb = self.map_noise(noise_labels.reshape(-1))                       # [cos|sin], no swap
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels.to(emb.dtype))
        emb = self.map_layer1(F.silu(self.map_layer0(emb)))                 # no silu yet
        if self.map_label is not None:
            if class_labels is None:
                raise ConfigError(f"DhariwalUNet has label_dim={self.label_dim}: class_labels are required")
            labels = _drop_labels(class_labels.to(emb.dtype), self.label_dropout, self.training)
            emb = emb + self.map_label(labels)                               # one-hot, not rescaled
        if extra_emb is not None:
            emb = emb + extra_emb
        return F.silu(emb)

    def encode(self, x: torch.Tensor, emb: torch.Tensor):
        skips = []
        for module in self.enc.values():
            x = module(x, emb) if isinstance(module, UNetBlock) else module(x)
            skips.append(x)
        return x, skips

    def decode(self, x: torch.Tensor, skips: list, emb: torch.Tensor) -> torch.Tensor:
        skips = list(skips)
        for module in self.dec.values():
            if x.shape[1] != module.in_channels:
                x = torch.cat([x, skips.pop()], dim=1)          # [x, skip]
            x = module(x, emb)
        assert not skips
        return self.out_conv(F.silu(self.out_norm(x)))

    def forward(self, x, noise_labels, class_labels=None, augment_labels=None) -> torch.Tensor:
        emb = self.embed(noise_labels, class_labels, augment_labels)
        x, skips = self.encode(x, emb)
        return self.decode(x, skips, emb)


@gin.configurable
class EDMNet(nn.Module):
    """Holds an EDM net as ``model`` (state-dict keys ``model.…``, as in the EDM pickles)
    and returns the raw output F = model(x, noise_labels, class_labels).

    ``class_labels``: float one-hot (B, label_dim), or integer class indices (B,) which are
    one-hot encoded here.  For a conditional net, ``None`` becomes a zero row of shape
    (1, label_dim), as EDMPrecond does.  Ignored by unconditional nets.

    ``fused_attention``: attention blocks through PyTorch's scaled-dot-product attention (off by default, so that
    existing results stay bit-identical; equal to EDM's explicit attention to float tolerance).

    ``extra_conditions``: names of extra scalar inputs (guidance's w), each embedded like the digits and PD
    UNets' (the sinusoidal features of 1000·value through Linear, SiLU, Linear with a zero-initialised last
    layer) and added where the class label joins the embedding; ``cond_emb`` holds them, so a teacher
    without them loads with those keys missing and the student starts equal to it.
    """

    def __init__(self, model: nn.Module = gin.REQUIRED, extra_conditions=(), fused_attention=False):
        super().__init__()
        self.model = model
        for block in model.modules():  # PyTorch's scaled-dot-product attention in every attention block
            if isinstance(block, UNetBlock):
                block.fused_attention = bool(fused_attention)
        self.extra_conditions = tuple(extra_conditions)
        width = model.map_layer0.in_features
        self.cond_emb = nn.ModuleDict({n: embedding_mlp(width, model.extra_width, last_scale=0.0)
                                       for n in self.extra_conditions})
        self.label_dim = int(getattr(model, "label_dim", 0))
        self.num_classes = self.label_dim if self.label_dim else 1
        self.img_resolution = model.img_resolution
        self.img_channels = model.in_channels

    #: the gin setting that removes the w input (one-line errors name it)
    w_input_setting = "drop 'w' from EDMNet.extra_conditions"

    def fresh_prefixes(self, names):
        """Where the branches of the new inputs ``names`` are in this network's state dict: ``cond_emb.<name>.``."""
        return tuple(f"cond_emb.{name}." for name in names)

    def _labels(self, class_labels, like: torch.Tensor):
        if not self.label_dim:
            return None
        if class_labels is None:
            return torch.zeros(1, self.label_dim, device=like.device, dtype=torch.float32)
        if not class_labels.is_floating_point():
            if class_labels.dim() != 1:
                raise ConfigError("integer class_labels must be class indices of shape (B,)")
            class_labels = F.one_hot(class_labels.long(), self.label_dim)
        return class_labels.to(torch.float32).reshape(-1, self.label_dim)

    def extra_embedding(self, extra, like):
        """Σ_name cond_emb[name](sinusoid(1000·value)) for the extra inputs, or None for a net without any;
        one line when the inputs given and the net's ``extra_conditions`` differ."""
        extra = extra or {}
        if set(extra) != set(self.extra_conditions):
            raise ConfigError(f"this EDM network takes the extra inputs {list(self.extra_conditions)} but got "
                              f"{sorted(extra)}: " + ("sample it with one (e.g. evaluate --w ...)" if self.extra_conditions
                                                      else "set EDMNet.extra_conditions = ('w',) for a w-conditioned student"))
        if not self.extra_conditions:
            return None
        width = self.model.map_layer0.in_features
        return sum(self.cond_emb[n](timestep_embedding(extra[n].reshape(-1).to(like.device), width, max_time=1.0)
                                    .to(like.dtype)) for n in self.extra_conditions)

    def run(self, x, noise_labels, class_labels=None, extra=None):
        """F(x, c_noise, labels[, extra inputs]): the EDM net's own call, or its embed/encode/decode with the extra
        embedding added beside the label."""
        extra_emb = self.extra_embedding(extra, x)
        if extra_emb is None:
            return self.model(x, noise_labels, class_labels)
        emb = self.model.embed(noise_labels, class_labels, extra_emb=extra_emb)
        h, skips = self.model.encode(x, emb)
        return self.model.decode(h, skips, emb)

    def forward(self, x, noise_labels, class_labels=None, augment_labels=None) -> torch.Tensor:
        kw = {} if augment_labels is None else dict(augment_labels=augment_labels)
        return self.model(x, noise_labels, self._labels(class_labels, x), **kw)


# Released configurations (edm-notes §2.1, §3.1).
CIFAR10_VE_KWARGS = dict(
    img_resolution=32, in_channels=3, out_channels=3, label_dim=0, augment_dim=9,
    model_channels=128, channel_mult=[2, 2, 2], channel_mult_emb=4, num_blocks=4,
    attn_resolutions=[16], dropout=0.13, label_dropout=0.0, embedding_type="fourier",
    channel_mult_noise=2, encoder_type="residual", decoder_type="standard",
    resample_filter=[1, 3, 3, 1],
)
IMAGENET64_ADM_KWARGS = dict(
    img_resolution=64, in_channels=3, out_channels=3, label_dim=1000, augment_dim=0,
    model_channels=192, channel_mult=[1, 2, 3, 4], channel_mult_emb=4, num_blocks=3,
    attn_resolutions=[32, 16, 8], dropout=0.10, label_dropout=0.0,
)
DIGITS_TINY_KWARGS = dict(
    img_resolution=8, in_channels=1, out_channels=1, label_dim=0, augment_dim=0,
    model_channels=16, channel_mult=[1, 2], channel_mult_emb=4, num_blocks=1,
    attn_resolutions=[4], dropout=0.0, label_dropout=0.0, embedding_type="fourier",
    channel_mult_noise=2, encoder_type="residual", decoder_type="standard",
    resample_filter=[1, 3, 3, 1],
)


@gin.configurable
def edm_cifar10_ve(augment_dim: int = 9, dropout: float = 0.13) -> EDMNet:
    """SongUNet of ``edm-cifar10-32x32-uncond-ve`` (56,397,827 params; augment_dim=0 drops
    ``map_augment``, 56,395,523, the layer is unused at inference).  ``dropout`` defaults to the
    released training value; the official TRACT code distils with 0."""
    return EDMNet(SongUNet(**{**CIFAR10_VE_KWARGS, "augment_dim": augment_dim, "dropout": dropout}))


@gin.configurable
def edm_imagenet64_adm(dropout: float = 0.10) -> EDMNet:
    """DhariwalUNet of ``edm-imagenet-64x64-cond-adm`` (295,899,267 params).  ``dropout`` defaults
    to the released training value; the official TRACT code distils with 0."""
    return EDMNet(DhariwalUNet(**{**IMAGENET64_ADM_KWARGS, "dropout": dropout}))


@gin.configurable
def edm_digits_tiny() -> EDMNet:
    """A tiny NCSN++-style SongUNet for 8×8 one-channel digits."""
    return EDMNet(SongUNet(**DIGITS_TINY_KWARGS))
