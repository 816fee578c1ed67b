"""Tests for the EDM teacher networks (tract_repro.networks.edm_unets / edm_layers).

Full-size nets are built on the meta device only; forward passes run on tiny configs.
"""
import math

import gin
import pytest
import torch
import torch.nn.functional as F

from tract_repro.networks.edm_layers import (
    Conv2d, FourierEmbedding, GroupNorm, PositionalEmbedding, UNetBlock, fir_filter,
)
from tract_repro.networks.edm_unets import (
    CIFAR10_VE_KWARGS, DIGITS_TINY_KWARGS, DhariwalUNet, EDMNet, SongUNet, edm_cifar10_ve,
    edm_digits_tiny, edm_imagenet64_adm,
)

TINY_SONG = dict(img_resolution=16, in_channels=3, out_channels=3, label_dim=0, augment_dim=9,
                 model_channels=16, channel_mult=[1, 2, 2], num_blocks=1, attn_resolutions=[8],
                 dropout=0.13, embedding_type="fourier", channel_mult_noise=2,
                 encoder_type="residual", decoder_type="standard", resample_filter=[1, 3, 3, 1])
TINY_ADM = dict(img_resolution=16, in_channels=3, out_channels=3, label_dim=10, model_channels=32,
                channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8], dropout=0.1)


def n_params(module):
    return sum(p.numel() for p in module.parameters())


def n_buffer_elems(module):
    return sum(b.numel() for b in module.buffers())


def perturb_(module, seed=0, std=0.1):
    """Seeded N(0, std²) re-init of every parameter, so zero-init layers hide nothing."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return module


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """These small CPU workloads run far faster on one thread on a shared 2-core box."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def cifar_meta():
    with torch.device("meta"):
        return edm_cifar10_ve()


@pytest.fixture(scope="module")
def imagenet_meta():
    with torch.device("meta"):
        return edm_imagenet64_adm()


# ----------------------------------------------------------------------------------------
# 1. Sizes, buffers and state-dict names of the released configurations.

def test_cifar_counts_and_keys(cifar_meta):
    net = cifar_meta
    assert isinstance(net, EDMNet) and isinstance(net.model, SongUNet)
    assert net.num_classes == 1
    assert n_params(net) == 56_397_827
    assert n_params(net.model.map_augment) == 2_304
    assert n_params(net.model.map_layer0) == 131_584
    assert n_params(net.model.map_layer1) == 262_656
    assert n_params(net.model.enc) == 19_900_160
    assert n_params(net.model.dec) == 36_101_123
    assert n_buffer_elems(net) == 288
    sd = net.state_dict()
    assert len(sd) == 432
    keys = list(sd)
    assert keys[:6] == ["model.map_noise.freqs", "model.map_augment.weight",
                        "model.map_layer0.weight", "model.map_layer0.bias",
                        "model.map_layer1.weight", "model.map_layer1.bias"]
    assert keys[6:8] == ["model.enc.32x32_conv.weight", "model.enc.32x32_conv.bias"]
    assert keys[-4:] == ["model.dec.32x32_aux_norm.weight", "model.dec.32x32_aux_norm.bias",
                         "model.dec.32x32_aux_conv.weight", "model.dec.32x32_aux_conv.bias"]
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    assert shapes["model.map_noise.freqs"] == (128,)
    assert shapes["model.map_augment.weight"] == (256, 9)
    assert shapes["model.map_layer0.weight"] == (512, 256)
    assert shapes["model.enc.16x16_aux_residual.weight"] == (256, 3, 3, 3)
    assert shapes["model.enc.8x8_aux_residual.weight"] == (256, 256, 3, 3)
    assert shapes["model.enc.16x16_block0.qkv.weight"] == (768, 256, 1, 1)
    assert shapes["model.dec.32x32_block4.conv0.weight"] == (256, 384, 3, 3)
    assert shapes["model.dec.32x32_aux_conv.weight"] == (3, 256, 3, 3)
    assert shapes["model.enc.16x16_block0.affine.weight"] == (256, 512)
    # Block-internal key order (a down block: FIR filters, 1x1 resampling skip).
    down = [k[len("model.enc.16x16_down."):] for k in keys if k.startswith("model.enc.16x16_down.")]
    assert down == ["norm0.weight", "norm0.bias", "conv0.weight", "conv0.bias", "conv0.resample_filter",
                    "affine.weight", "affine.bias", "norm1.weight", "norm1.bias", "conv1.weight",
                    "conv1.bias", "skip.weight", "skip.bias", "skip.resample_filter"]
    attn = [k[len("model.dec.8x8_in0."):] for k in keys if k.startswith("model.dec.8x8_in0.")]
    assert attn[-6:] == ["norm2.weight", "norm2.bias", "qkv.weight", "qkv.bias", "proj.weight", "proj.bias"]
    filters = [k for k in keys if k.endswith("resample_filter")]
    assert len(filters) == 10 and all(shapes[k] == (1, 1, 4, 4) for k in filters)
    assert "model.enc.16x16_aux_residual.resample_filter" in filters
    # Blocks, attention and GroupNorm settings.
    blocks = [m for m in net.modules() if isinstance(m, UNetBlock)]
    assert len(blocks) == 33 and sum(b.num_heads > 0 for b in blocks) == 6
    assert all(b.num_heads in (0, 1) and not b.adaptive_scale for b in blocks)
    assert all(math.isclose(b.skip_scale, math.sqrt(0.5)) for b in blocks)
    attn_names = sorted(n for n, m in net.model.dec.items() if isinstance(m, UNetBlock) and m.num_heads)
    assert attn_names == ["16x16_block4", "8x8_in0"]
    norms = [m for m in net.modules() if isinstance(m, GroupNorm)]
    assert all(m.num_groups == 32 and m.eps == 1e-6 for m in norms)


def test_cifar_without_augment(cifar_meta):
    with torch.device("meta"):
        net = edm_cifar10_ve(augment_dim=0)
    assert n_params(net) == 56_395_523
    sd = net.state_dict()
    assert len(sd) == 431
    assert set(cifar_meta.state_dict()) - set(sd) == {"model.map_augment.weight"}


def test_imagenet_counts_and_keys(imagenet_meta):
    net = imagenet_meta
    assert isinstance(net.model, DhariwalUNet)
    assert net.num_classes == 1000
    assert n_params(net) == 295_899_267
    parts = dict(map_layer0=148_224, map_layer1=590_592, map_label=768_000, enc=90_298_560,
                 dec=204_088_320, out_norm=384, out_conv=5_187)
    for name, count in parts.items():
        assert n_params(getattr(net.model, name)) == count, name
    assert n_buffer_elems(net) == 48
    sd = net.state_dict()
    assert len(sd) == 553
    keys = list(sd)
    assert keys[:7] == ["model.map_layer0.weight", "model.map_layer0.bias", "model.map_layer1.weight",
                        "model.map_layer1.bias", "model.map_label.weight",
                        "model.enc.64x64_conv.weight", "model.enc.64x64_conv.bias"]
    assert keys[-4:] == ["model.out_norm.weight", "model.out_norm.bias",
                         "model.out_conv.weight", "model.out_conv.bias"]
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    assert shapes["model.map_layer0.weight"] == (768, 192)
    assert shapes["model.map_label.weight"] == (768, 1000)
    assert shapes["model.out_conv.weight"] == (3, 192, 3, 3)
    assert shapes["model.enc.32x32_block0.affine.weight"] == (2 * 384, 768)   # (scale, shift)
    assert shapes["model.dec.8x8_block3.conv0.weight"] == (768, 1344, 3, 3)
    assert shapes["model.dec.64x64_block0.conv0.weight"] == (192, 576, 3, 3)
    down = [k[len("model.enc.32x32_down."):] for k in keys if k.startswith("model.enc.32x32_down.")]
    assert down == ["norm0.weight", "norm0.bias", "conv0.weight", "conv0.bias", "conv0.resample_filter",
                    "affine.weight", "affine.bias", "norm1.weight", "norm1.bias", "conv1.weight",
                    "conv1.bias", "skip.resample_filter"]           # parameter-free skip
    filters = [k for k in keys if k.endswith("resample_filter")]
    assert len(filters) == 12 and all(shapes[k] == (1, 1, 2, 2) for k in filters)
    blocks = [m for m in net.modules() if isinstance(m, UNetBlock)]
    assert len(blocks) == 36 and sum(b.num_heads > 0 for b in blocks) == 22
    heads = {n: m.num_heads for n, m in net.model.dec.items()}
    assert heads["8x8_in0"] == 12 and heads["8x8_in1"] == 0 and heads["8x8_block3"] == 12
    assert heads["16x16_block0"] == 9 and heads["32x32_block3"] == 6 and heads["64x64_block0"] == 0
    assert all(b.adaptive_scale and b.skip_scale == 1 for b in blocks)
    norms = [m for m in net.modules() if isinstance(m, GroupNorm)]
    assert all(m.num_groups == 32 and m.eps == 1e-5 for m in norms)


def test_song_resample_filters_cpu():
    torch.manual_seed(0)
    cfg = dict(TINY_SONG, channel_mult=[1, 1, 1, 1], num_blocks=0, attn_resolutions=[])
    net = SongUNet(**cfg)
    filters = {k: v for k, v in net.state_dict().items() if k.endswith("resample_filter")}
    # 3 down blocks (conv0 + skip) + 3 aux_residual + 3 up blocks (conv0 + skip) = 15.
    assert len(filters) == 15
    r = torch.tensor([1.0, 3.0, 3.0, 1.0])
    expected = (torch.outer(r, r) / 64).reshape(1, 1, 4, 4)
    for v in filters.values():
        assert v.shape == (1, 1, 4, 4) and v.dtype == torch.float32
        torch.testing.assert_close(v, expected, rtol=0, atol=0)
    # The same filter in the CIFAR layout: all 10 buffers of a CPU-built CIFAR SongUNet
    # skeleton (tiny widths, same levels and filter) equal it.
    small = SongUNet(**dict(CIFAR10_VE_KWARGS, model_channels=8, num_blocks=1))
    fs = [v for k, v in small.state_dict().items() if k.endswith("resample_filter")]
    assert len(fs) == 10
    assert all(torch.equal(v, expected) for v in fs)
    torch.testing.assert_close(fir_filter([1, 1]), torch.full((1, 1, 2, 2), 0.25))


def test_fourier_freqs_is_a_buffer_that_loads():
    torch.manual_seed(0)
    a, b = SongUNet(**TINY_SONG), SongUNet(**TINY_SONG)
    assert not torch.equal(a.map_noise.freqs, b.map_noise.freqs)
    b.load_state_dict(a.state_dict(), strict=True)
    assert torch.equal(a.map_noise.freqs, b.map_noise.freqs)
    assert "map_noise.freqs" not in dict(a.named_parameters())


# ----------------------------------------------------------------------------------------
# 2. Tiny forward passes, FIR resampling, label sensitivity.

def test_fir_resampling_shapes_and_values():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 8, 8)
    for taps in ([1, 3, 3, 1], [1, 1]):
        down = Conv2d(5, 5, kernel=0, down=True, resample_filter=taps)
        up = Conv2d(5, 5, kernel=0, up=True, resample_filter=taps)
        assert down(x).shape == (2, 5, 4, 4) and up(x).shape == (2, 5, 16, 16)
        assert n_params(down) == 0 and n_params(up) == 0
    # [1,1]: 2x2 average pooling / nearest-neighbour upsampling.
    torch.testing.assert_close(Conv2d(5, 5, 0, down=True, resample_filter=[1, 1])(x), F.avg_pool2d(x, 2))
    torch.testing.assert_close(Conv2d(5, 5, 0, up=True, resample_filter=[1, 1])(x),
                               F.interpolate(x, scale_factor=2, mode="nearest"))
    # Constant images stay constant in the interior under the normalised [1,3,3,1] filter.
    c = torch.ones(1, 1, 8, 8)
    torch.testing.assert_close(Conv2d(1, 1, 0, up=True, resample_filter=[1, 3, 3, 1])(c)[..., 1:-1, 1:-1],
                               torch.ones(1, 1, 14, 14))
    # Fused down (aux_residual): 32 -> 34 -> 16, and equal to an explicit computation.
    conv = Conv2d(3, 4, kernel=3, down=True, resample_filter=[1, 3, 3, 1], fused_resample=True,
                  init_mode="xavier_uniform")
    with torch.no_grad():
        conv.bias.normal_()
    y = torch.randn(2, 3, 32, 32)
    out = conv(y)
    assert out.shape == (2, 4, 16, 16)
    f = conv.resample_filter.expand(4, 1, 4, 4)
    ref = F.conv2d(F.conv2d(y, conv.weight, padding=2), f, stride=2, groups=4) + conv.bias.view(1, -1, 1, 1)
    torch.testing.assert_close(out, ref)
    # Non-fused down with weights: FIR first (pad 1), then the 3x3 conv (pad 1).
    conv2 = Conv2d(3, 4, kernel=3, down=True, resample_filter=[1, 3, 3, 1], init_mode="xavier_uniform")
    f3 = conv2.resample_filter.expand(3, 1, 4, 4)
    ref2 = F.conv2d(F.conv2d(y, f3, stride=2, padding=1, groups=3), conv2.weight, padding=1)
    torch.testing.assert_close(conv2(y), ref2)


def test_tiny_song_forward():
    torch.manual_seed(0)
    net = EDMNet(perturb_(SongUNet(**TINY_SONG))).eval()
    x = torch.randn(3, 3, 16, 16)
    c = torch.randn(3)
    out = net(x, c)
    assert out.shape == x.shape and torch.isfinite(out).all()
    # A shape-(1,) noise label broadcasts over the batch.
    out1 = net(x, c[:1])
    torch.testing.assert_close(out1[:1], out[:1], rtol=1e-5, atol=1e-5)
    # Augment labels only act when given.
    aug = torch.randn(3, 9)
    assert not torch.allclose(net(x, c, augment_labels=aug), out)
    # Dropout only in training.
    torch.testing.assert_close(net(x, c), out)


def test_digits_tiny_config():
    torch.manual_seed(0)
    net = edm_digits_tiny()
    count = n_params(net)
    assert 100_000 <= count <= 400_000
    assert count == 189_953
    assert net.num_classes == 1 and net.img_resolution == 8 and net.img_channels == 1
    x = torch.randn(4, 1, 8, 8)
    out = net(x, torch.randn(4))
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert DIGITS_TINY_KWARGS["attn_resolutions"] == [4]


def test_tiny_adm_forward_and_labels():
    torch.manual_seed(0)
    net = EDMNet(perturb_(DhariwalUNet(**TINY_ADM), std=0.05)).eval()
    assert net.num_classes == 10
    x = torch.randn(2, 3, 16, 16)
    c = torch.randn(2)
    onehot = F.one_hot(torch.tensor([1, 4]), 10).float()
    out = net(x, c, onehot)
    assert out.shape == x.shape and torch.isfinite(out).all()
    other = net(x, c, F.one_hot(torch.tensor([2, 4]), 10).float())
    assert not torch.allclose(out[0], other[0], atol=1e-4)        # label changed
    torch.testing.assert_close(out[1], other[1])                   # label kept
    # Integer labels are one-hot encoded; None means a zero label row.
    torch.testing.assert_close(net(x, c, torch.tensor([1, 4])), out)
    zeros = net(x, c, torch.zeros(2, 10))
    torch.testing.assert_close(net(x, c, None), zeros)


def test_embeddings_song_vs_adm():
    """sin/cos swap, √label_dim scaling and the silu placement."""
    torch.manual_seed(0)
    song = perturb_(SongUNet(**dict(TINY_SONG, label_dim=5, augment_dim=0))).eval()
    c = torch.randn(4)
    labels = F.one_hot(torch.tensor([0, 1, 2, 3]), 5).float()
    arg = torch.outer(c, 2 * math.pi * song.map_noise.freqs)
    e = torch.cat([arg.sin(), arg.cos()], dim=1)                  # swapped to [sin | cos]
    e = e + labels @ song.map_label.weight.t() * math.sqrt(5) + song.map_label.bias
    e = F.silu(e @ song.map_layer0.weight.t() + song.map_layer0.bias)
    e = F.silu(e @ song.map_layer1.weight.t() + song.map_layer1.bias)
    torch.testing.assert_close(song.embed(c, labels), e)

    adm = perturb_(DhariwalUNet(**TINY_ADM)).eval()
    freqs = (1 / 10000) ** (torch.arange(16) / 16)                 # endpoint False, h = C/2 = 16
    arg = torch.outer(c, freqs)
    e = torch.cat([arg.cos(), arg.sin()], dim=1)                  # no swap
    e = F.silu(e @ adm.map_layer0.weight.t() + adm.map_layer0.bias)
    e = e @ adm.map_layer1.weight.t() + adm.map_layer1.bias
    lab = F.one_hot(torch.tensor([0, 1, 2, 3]), 10).float()
    e = F.silu(e + lab @ adm.map_label.weight.t())
    torch.testing.assert_close(adm.embed(c, lab), e)
    # Positional embedding with endpoint (DDPM++): last frequency is exactly 1/10000.
    pe = PositionalEmbedding(8, endpoint=True)(torch.tensor([1.0]))
    torch.testing.assert_close(pe[0, 3], torch.tensor(math.cos(1e-4)))
    fe = FourierEmbedding(6)
    assert fe.freqs.shape == (3,)


def test_adaptive_scale_order():
    """ADM modulation: silu(shift + norm1(h)·(scale + 1)) with scale = first half."""
    torch.manual_seed(0)
    blk = perturb_(UNetBlock(8, 8, emb_channels=6, adaptive_scale=True, eps=1e-5)).eval()
    x, emb = torch.randn(2, 8, 4, 4), torch.randn(2, 6)
    h = blk.conv0(F.silu(blk.norm0(x)))
    p = (emb @ blk.affine.weight.t() + blk.affine.bias)[:, :, None, None]
    scale, shift = p[:, :8], p[:, 8:]
    h = F.silu(shift + F.group_norm(h, 2, blk.norm1.weight, blk.norm1.bias, 1e-5) * (scale + 1))
    ref = blk.conv1(h) + x
    torch.testing.assert_close(blk(x, emb), ref)


# ----------------------------------------------------------------------------------------
# 3. Attention: interleaved qkv layout, fp32 softmax.

@pytest.mark.parametrize("heads", [1, 2])
def test_attention_interleaved_qkv(heads):
    torch.manual_seed(0)
    C, B, H, W = 8, 2, 3, 4
    blk = perturb_(UNetBlock(C, C, emb_channels=6, attention=True, num_heads=heads,
                             skip_scale=math.sqrt(0.5), adaptive_scale=False, eps=1e-6)).eval()
    x, emb = torch.randn(B, C, H, W), torch.randn(B, 6)
    # Everything before attention, recomputed by hand.
    h = blk.conv0(F.silu(blk.norm0(x)))
    h = F.silu(blk.norm1(h + blk.affine(emb)[:, :, None, None]))
    h = (blk.conv1(h) + x) * math.sqrt(0.5)
    t = blk.qkv(blk.norm2(h)).reshape(B, 3 * C, H * W)
    d = C // heads
    idx = torch.empty(heads, d, 3, dtype=torch.long)             # idx[g, c, j] = g·3d + 3c + j
    for g in range(heads):
        for c in range(d):
            for j in range(3):
                idx[g, c, j] = g * (3 * C // heads) + c * 3 + j
    q, k, v = (t[:, idx[:, :, j]] for j in range(3))              # [B, heads, d, L]
    logits = torch.einsum("bgcq,bgck->bgqk", q.double(), k.double()) / math.sqrt(d)
    w = logits.softmax(dim=-1)
    a = torch.einsum("bgqk,bgck->bgcq", w, v.double()).reshape(B, C, H, W).float()
    ref = (blk.proj(a) + h) * math.sqrt(0.5)
    torch.testing.assert_close(blk(x, emb), ref, rtol=1e-5, atol=1e-5)
    # A block-[q|k|v] reading gives a different answer (the layout matters).
    qb, kb, vb = t.reshape(B, 3, heads, d, H * W).unbind(1)
    wb = torch.einsum("bgcq,bgck->bgqk", qb, kb).div(math.sqrt(d)).softmax(-1)
    ab = torch.einsum("bgqk,bgck->bgcq", wb, vb).reshape(B, C, H, W)
    assert not torch.allclose(blk(x, emb), (blk.proj(ab) + h) * math.sqrt(0.5), atol=1e-4)


def test_attention_softmax_fp32_with_half_inputs():
    from tract_repro.networks.edm_layers import attention_weights
    q = torch.randn(2, 4, 5).half()
    k = torch.randn(2, 4, 5).half()
    w = attention_weights(q, k)
    assert w.dtype == torch.float16
    ref = torch.einsum("ncq,nck->nqk", q.float(), k.float() / 2).softmax(2)
    torch.testing.assert_close(w.float(), ref, rtol=1e-3, atol=1e-3)


# ----------------------------------------------------------------------------------------
# 4. Encoder skips, aux_residual overwrite and decoder concat order.

def test_cifar_skip_structure(cifar_meta):
    model = cifar_meta.model
    assert model.skip_channels == (128,) + (256,) * 14
    with torch.device("meta"):
        x = torch.empty(2, 3, 32, 32)
        emb = model.embed(torch.empty(2))
        h, skips = model.encode(x, emb)
    assert len(skips) == 15
    assert [s.shape[1] for s in skips] == [128] + [256] * 14
    assert [s.shape[-1] for s in skips] == [32] * 5 + [16] * 5 + [8] * 5
    assert h.shape == (2, 256, 8, 8)
    # Decoder inputs: blockN has in = x + popped skip, in0/in1/up do not concatenate.
    ins = {n: m.in_channels for n, m in model.dec.items() if isinstance(m, UNetBlock)}
    assert ins["8x8_in0"] == ins["8x8_in1"] == ins["16x16_up"] == 256
    assert all(ins[f"{r}_block{i}"] == 512 for r in ("8x8", "16x16", "32x32") for i in range(4))
    assert ins["8x8_block4"] == ins["16x16_block4"] == 512 and ins["32x32_block4"] == 384


def test_aux_residual_overwrites_last_skip_and_concat_order():
    torch.manual_seed(0)
    net = perturb_(SongUNet(**TINY_SONG)).eval()
    x = torch.randn(2, 3, 16, 16)
    emb = net.embed(torch.randn(2))
    captured = {}
    hooks = [m.register_forward_hook(lambda mod, inp, out, n=n: captured.__setitem__(n, (inp, out)))
             for n, m in net.enc.items()]
    h, skips = net.encode(x, emb)
    for hk in hooks:
        hk.remove()
    names = list(net.enc)
    assert names == ["16x16_conv", "16x16_block0", "8x8_down", "8x8_aux_residual", "8x8_block0",
                     "4x4_down", "4x4_aux_residual", "4x4_block0"]
    assert len(skips) == 6
    # Skip 2 is the residual merge, not the raw output of 8x8_down.
    down_out = captured["8x8_down"][1]
    merged = (down_out + net.enc["8x8_aux_residual"](x)) / math.sqrt(2)
    torch.testing.assert_close(skips[2], merged)
    assert not torch.allclose(skips[2], down_out)
    # The second aux_residual reads the running aux (= the first merge).
    torch.testing.assert_close(captured["4x4_aux_residual"][0][0], merged)
    merged2 = (captured["4x4_down"][1] + net.enc["4x4_aux_residual"](merged)) / math.sqrt(2)
    torch.testing.assert_close(skips[4], merged2)
    torch.testing.assert_close(captured["4x4_block0"][0][0], merged2)
    # Decoder: every blockN sees cat([x, skip]) with skips popped last-in first-out.
    seen = {}
    hooks = [m.register_forward_pre_hook(lambda mod, inp, n=n: seen.__setitem__(n, inp[0]))
             for n, m in net.dec.items() if isinstance(m, UNetBlock)]
    outs = {}
    hooks += [m.register_forward_hook(lambda mod, inp, out, n=n: outs.__setitem__(n, out))
              for n, m in net.dec.items() if isinstance(m, UNetBlock)]
    out = net.decode(h, skips, emb)
    for hk in hooks:
        hk.remove()
    assert out.shape == x.shape
    order = [n for n in net.dec if n.split("_", 1)[1].startswith(("block", "in", "up"))]
    popped = list(skips)
    prev = h
    for n in order:
        inp = seen[n]
        if "block" in n:
            s = popped.pop()
            torch.testing.assert_close(inp, torch.cat([prev, s], dim=1))
        else:
            torch.testing.assert_close(inp, prev)
        prev = outs[n]
    assert not popped


def test_state_dict_roundtrip_and_gin():
    torch.manual_seed(0)
    a = EDMNet(perturb_(DhariwalUNet(**TINY_ADM)))
    b = EDMNet(DhariwalUNet(**TINY_ADM))
    b.load_state_dict(a.state_dict(), strict=True)
    x, c, lab = torch.randn(1, 3, 16, 16), torch.randn(1), torch.tensor([3])
    torch.testing.assert_close(a.eval()(x, c, lab), b.eval()(x, c, lab))
    gin.parse_config("""
        EDMNet.model = @SongUNet()
        SongUNet.img_resolution = 8
        SongUNet.in_channels = 1
        SongUNet.out_channels = 1
        SongUNet.model_channels = 16
        SongUNet.channel_mult = [1, 2]
        SongUNet.num_blocks = 1
        SongUNet.attn_resolutions = [4]
        SongUNet.embedding_type = 'fourier'
        SongUNet.channel_mult_noise = 2
        SongUNet.encoder_type = 'residual'
        SongUNet.resample_filter = [1, 3, 3, 1]
    """)
    net = EDMNet()
    assert n_params(net) == n_params(edm_digits_tiny())
    assert [k for k, _ in net.state_dict().items()] == list(edm_digits_tiny().state_dict())


@pytest.mark.parametrize("arch", ["adm", "song"])
def test_an_edm_w_input_starts_at_zero_so_the_student_equals_the_teacher_for_every_w(arch):
    """EDMNet.extra_conditions = ('w',): the w branch joins beside the class label and starts at zero, so the student
    loaded from a teacher (its cond_emb keys missing) is the teacher exactly at every w; ∅ (label −1) is the zero
    one-hot row; a w the network does not take, or a missing one, is one line."""
    from tract_repro.common.errors import ConfigError
    from tract_repro.networks.conditioning import Cond
    from tract_repro.networks.edm_denoiser import EDMDenoiser
    from tract_repro.networks.guidance import GuidedDenoiser, takes_input

    kwargs = dict(TINY_ADM) if arch == "adm" else dict(TINY_SONG, label_dim=10, augment_dim=0)
    arch_cls = DhariwalUNet if arch == "adm" else SongUNet
    torch.manual_seed(0)
    teacher = EDMDenoiser(EDMNet(perturb_(arch_cls(**kwargs), std=0.05))).eval()
    student = EDMDenoiser(EDMNet(arch_cls(**kwargs), extra_conditions=("w",))).eval()
    missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
    assert unexpected == [] and missing and all(k.startswith("net.cond_emb.w.") for k in missing)
    assert takes_input(student, "w") and not takes_input(teacher, "w")
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    logsnr, labels = torch.linspace(-4, 4, 4, dtype=torch.float64), torch.tensor([0, 3, 9, -1])
    with torch.no_grad():
        plain = teacher(x, logsnr, Cond(labels))
        for w in (0.0, 1.7, 4.0):
            assert torch.equal(student(x, logsnr, Cond(labels, {"w": torch.full((4,), w, dtype=torch.float64)})), plain)
        null = teacher(x[3:], logsnr[3:], Cond(torch.zeros(1, 10)))  # an all-zero one-hot row
        torch.testing.assert_close(plain[3:], null, rtol=0, atol=1e-6)  # float32 convolutions of another batch size
        perturb_(student.net.cond_emb, seed=3)
        w0 = student(x, logsnr, Cond(labels, {"w": torch.zeros(4, dtype=torch.float64)}))
        w4 = student(x, logsnr, Cond(labels, {"w": torch.full((4,), 4.0, dtype=torch.float64)}))
        assert not torch.allclose(w0, w4)  # w reaches the output once its branch is trained
        guided = GuidedDenoiser(teacher)(x, logsnr, Cond(labels.clamp(min=0), {"w": torch.full((4,), 2.0, dtype=torch.float64)}))
        unconditional = teacher(x, logsnr, Cond(torch.full((4,), -1)))
        torch.testing.assert_close(guided, 3 * teacher(x, logsnr, Cond(labels.clamp(min=0))) - 2 * unconditional,
                                   rtol=0, atol=1e-5)
    with pytest.raises(ConfigError, match="set EDMNet.extra_conditions"):
        teacher(x, logsnr, Cond(labels, {"w": torch.zeros(4, dtype=torch.float64)}))
    with pytest.raises(ConfigError, match="evaluate --w"):
        student(x, logsnr, Cond(labels))


@pytest.mark.parametrize("arch", ["adm", "song"])
def test_fused_attention_equals_edms_explicit_attention(arch):
    """EDMNet(fused_attention=True): every attention block through F.scaled_dot_product_attention, equal to EDM's
    softmax(qᵀk/√c)·v to float32 tolerance, with the same weights."""
    kwargs = dict(TINY_ADM) if arch == "adm" else dict(TINY_SONG, augment_dim=0)
    arch_cls = DhariwalUNet if arch == "adm" else SongUNet
    torch.manual_seed(0)
    explicit = EDMNet(perturb_(arch_cls(**kwargs), std=0.05)).eval()
    fused = EDMNet(arch_cls(**kwargs), fused_attention=True).eval()
    fused.load_state_dict(explicit.state_dict())
    assert any(getattr(m, "fused_attention", False) for m in fused.modules())
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    noise, labels = torch.tensor([0.1, 1.0, 3.0]), (torch.tensor([1, 4, 7]) if arch == "adm" else None)
    with torch.no_grad():
        a, b = explicit(x, noise, labels), fused(x, noise, labels)
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    assert not torch.equal(a, explicit(x, noise * 2, labels))  # the inputs matter (the comparison is not vacuous)
