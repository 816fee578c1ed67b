"""Tests for the Progressive-Distillation UNet port (tract_repro.networks.unet)."""
import math

import gin
import pytest
import torch

from tract_repro.networks.layers import SelfAttention
from tract_repro.networks.unet import UNet

CIFAR10 = dict(in_channels=3, resolution=32, channels=256, emb_channels=1024, channel_mult=(1, 1, 1),
               num_res_blocks=3, attn_resolutions=(16, 8), attn_heads=1, num_outputs=1, num_classes=1)
IMAGENET64 = dict(in_channels=3, resolution=64, channels=192, emb_channels=768, channel_mult=(1, 2, 3, 4),
                  num_res_blocks=3, attn_resolutions=(32, 16, 8), attn_head_dim=64, num_outputs=2,
                  num_classes=1000)
DIGITS = dict(in_channels=1, resolution=8, channels=16, emb_channels=64, channel_mult=(1, 2),
              num_res_blocks=1, attn_resolutions=(4,), num_outputs=1, norm_groups=8)  # = gin/digits/base.gin


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def perturb_(model, seed=0, std=0.05):
    """Re-init every parameter ~ N(0, std) so zero-init layers no longer hide inputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def inputs(batch=4, ch=1, res=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, ch, res, res, generator=g), torch.linspace(-10.0, 10.0, batch)


@pytest.fixture
def clean_gin():
    gin.clear_config()
    yield
    gin.clear_config()


@pytest.mark.parametrize("kwargs, count, n_down, n_up", [
    (CIFAR10, 60_004_099, 12, 14),
    (IMAGENET64, 295_905_222, 16, 19),
])
def test_official_parameter_counts(kwargs, count, n_down, n_up):
    with torch.device("meta"):
        model = UNet(**kwargs)
    assert n_params(model) == count
    assert 1 + len(model.down) == n_down  # conv_in + down blocks
    assert len(model.up) == n_up


def test_imagenet_head_counts():
    with torch.device("meta"):
        model = UNet(**IMAGENET64)
    heads = {blk.attn.qkv.in_channels: blk.attn.heads for blk in [*model.down, *model.mid, *model.up] if blk.attn}
    assert heads == {384: 6, 576: 9, 768: 12}


def test_digits_forward_and_zero_init():
    torch.manual_seed(0)
    model = UNet(**DIGITS)
    assert n_params(model) == 208_369
    x, logsnr = inputs(batch=6)
    out = model(x, logsnr)
    assert out.shape == (6, 1, 8, 8)
    assert torch.isfinite(out).all()
    # "Zero init" is variance scaling with scale 1e-10 (weights ~1e-6), so the initial
    # output is tiny but not exactly zero.
    assert out.abs().max() < 1e-4
    out.square().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_num_outputs_channels():
    torch.manual_seed(0)
    model = UNet(**{**DIGITS, "num_outputs": 2})
    x, logsnr = inputs()
    assert model(x, logsnr).shape == (4, 2, 8, 8)


def test_class_conditioning():
    torch.manual_seed(0)
    model = perturb_(UNet(**{**DIGITS, "num_classes": 10})).eval()
    x, logsnr = inputs(batch=2)
    a = model(x, logsnr, labels=torch.tensor([0, 1]))
    b = model(x, logsnr, labels=torch.tensor([2, 3]))
    assert (a - b).abs().max() > 1e-5  # float noise is ~1e-8
    with pytest.raises(ValueError):
        model(x, logsnr)
    uncond = UNet(**DIGITS)
    with pytest.raises(ValueError):
        uncond(x, logsnr, labels=torch.tensor([0, 1]))


def test_logsnr_changes_output():
    torch.manual_seed(0)
    model = perturb_(UNet(**DIGITS)).eval()
    x, _ = inputs(batch=2)
    a = model(x, torch.tensor([-3.0, 3.0]))
    b = model(x, torch.tensor([3.0, -3.0]))
    assert (a - b).abs().max() > 1e-5  # float noise is ~1e-8


def _reference_attention(attn, x, heads):
    """Explicit multi-head attention from the qkv conv output channel slices."""
    b, c, hh, ww = x.shape
    hd = c // heads
    qkv = attn.qkv(attn.norm(x)).reshape(b, 3 * c, hh * ww)
    outs = []
    for h in range(heads):
        base = 3 * hd * h
        q, k, v = qkv[:, base:base + hd], qkv[:, base + hd:base + 2 * hd], qkv[:, base + 2 * hd:base + 3 * hd]
        w = torch.softmax(torch.einsum("bcq,bck->bqk", q, k) / math.sqrt(hd), dim=-1)
        outs.append(torch.einsum("bqk,bck->bcq", w, v))
    o = torch.cat(outs, dim=1).reshape(b, c, hh, ww)
    return x + attn.proj(o)


@pytest.mark.parametrize("heads", [1, 2])
def test_attention_matches_reference(heads):
    torch.manual_seed(0)
    attn = perturb_(SelfAttention(8, heads=heads, norm_groups=4), std=0.3)
    x = torch.randn(3, 8, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(attn(x), _reference_attention(attn, x, heads), atol=1e-5, rtol=1e-5)


def test_extra_condition():
    torch.manual_seed(0)
    model = perturb_(UNet(**{**DIGITS, "extra_conditions": ("w",)})).eval()
    assert set(model.cond_emb) == {"w"}
    x, logsnr = inputs(batch=2)
    a = model(x, logsnr, cond={"w": torch.tensor([0.0, 1.0])})
    b = model(x, logsnr, cond={"w": torch.tensor([2.0, 4.0])})
    assert (a - b).abs().max() > 1e-5  # float noise is ~1e-8
    with pytest.raises(ValueError):
        model(x, logsnr)
    with pytest.raises(ValueError):
        model(x, logsnr, cond={"v": torch.zeros(2)})


def test_bad_logsnr_input():
    with pytest.raises(ValueError):
        UNet(**DIGITS, logsnr_input="linear")


def test_gin_configurable(clean_gin):
    gin.parse_config("\n".join([
        "UNet.in_channels = 1",
        "UNet.resolution = 8",
        "UNet.channels = 32",
        "UNet.channel_mult = (1, 2)",
        "UNet.num_res_blocks = 1",
        "UNet.attn_resolutions = (4,)",
        "UNet.norm_groups = 8",
    ]))
    model = UNet()
    assert model.channels == 32 and model.emb_channels == 128
    assert model.conv_in.weight.shape == (32, 1, 3, 3)
    assert len(model.down) == 3 and len(model.up) == 5
    assert model.up[0].res.conv1.out_channels == 64
    x, logsnr = inputs(batch=2)
    assert model(x, logsnr).shape == (2, 1, 8, 8)


def test_digits_gin_builds_the_tested_digits_unet():
    from tract_repro import config

    config.parse(["gin/digits_teacher.gin"], [])
    with torch.device("meta"):
        net = config.build("train.network")
    assert n_params(net) == 208_369
