"""Tests for the Google PD (Flax msgpack) teacher importer (tract_repro.networks.google_pd).

The checkpoints written here are built by *inverting* the documented Flax → PyTorch mapping
independently of the importer: the module names of the tiny UNet are listed by hand and the
inverse transforms are written out below.
"""
import math

import msgpack
import numpy as np
import pytest
import torch

from tract_repro.networks.google_pd import (
    google_pd_mapping, import_teacher, load_google_pd, read_flax_msgpack, write_flax_msgpack,
)
from tract_repro.networks.unet import UNet

TINY = dict(in_channels=3, resolution=8, channels=8, emb_channels=16, channel_mult=(1, 2),
            num_res_blocks=1, attn_resolutions=(4,), attn_heads=2, num_outputs=2, num_classes=3,
            norm_groups=4)
CIFAR10 = dict(in_channels=3, resolution=32, channels=256, emb_channels=1024, channel_mult=(1, 1, 1),
               num_res_blocks=3, attn_resolutions=(16, 8), attn_heads=1, num_outputs=1, num_classes=1)
IMAGENET64 = dict(in_channels=3, resolution=64, channels=192, emb_channels=768, channel_mult=(1, 2, 3, 4),
                  num_res_blocks=3, attn_resolutions=(32, 16, 8), attn_head_dim=64, num_outputs=2,
                  num_classes=1000)

# Hand-written for TINY: levels (1, 2) of 1 block, attention at 4 px (level 1) and in the middle.
# Our module prefix -> (Flax module name, kind).
TINY_MODULES = {
    "time.0": ("dense0", "dense"),
    "time.2": ("dense1", "dense"),
    "class_emb": ("class_emb", "dense"),
    "conv_in": ("conv_in", "conv"),
    "down.0.res": ("down_0.block_0", "res"),         # 8 px, 8 -> 8
    "down.1.res": ("down_0.downsample", "res"),      # 8 -> 4 px
    "down.2.res": ("down_1.block_0", "res"),         # 4 px, 8 -> 16 (nin_shortcut)
    "down.2.attn": ("down_1.attn_0", "attn"),
    "mid.0.res": ("mid.block_1", "res"),
    "mid.0.attn": ("mid.attn_1", "attn"),
    "mid.1.res": ("mid.block_2", "res"),
    "up.0.res": ("up_1.block_0", "res"),             # 4 px, 16 + 16 -> 16
    "up.0.attn": ("up_1.attn_0", "attn"),
    "up.1.res": ("up_1.block_1", "res"),             # 16 + 8 -> 16
    "up.1.attn": ("up_1.attn_1", "attn"),
    "up.2.res": ("up_1.upsample", "res"),            # 4 -> 8 px
    "up.3.res": ("up_0.block_0", "res"),             # 8 px, 16 + 8 -> 8
    "up.4.res": ("up_0.block_1", "res"),             # 8 + 8 -> 8
    "out_norm": ("norm_out", "norm"),
    "out_conv": ("conv_out", "conv"),
}
RES_SUB = {"norm1": ("norm1", "norm"), "conv1": ("conv1", "conv"), "time": ("temb_proj", "dense"),
           "norm2": ("norm2", "norm"), "conv2": ("conv2", "conv"), "skip": ("nin_shortcut", "nin")}


def tiny_unet():
    torch.manual_seed(0)
    return UNet(**TINY)


def identifying_state(unet, scale=2.0 ** -20):
    """Every element of every parameter gets its own value: a global running index times
    ``scale`` (exact in float32 while the index < 2**24)."""
    out, offset = {}, 0
    for name, p in unet.state_dict().items():
        n = p.numel()
        out[name] = (torch.arange(offset, offset + n, dtype=torch.float64) * scale).float().reshape(p.shape)
        offset += n
    assert offset < 2 ** 24
    return out


def _set(tree, path, value):
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    assert path[-1] not in tree, path
    tree[path[-1]] = value


def to_flax(state, heads_of):
    """Inverse of the documented mapping, for the TINY UNet: our state dict -> Flax params tree."""
    params = {}

    def layer(ours, path, kind):
        w = state[f"{ours}.weight"].numpy()
        b = state[f"{ours}.bias"].numpy()
        if kind == "norm":
            _set(params, path + ("scale",), w.copy())
        elif kind == "conv":  # [out, in, kH, kW] -> [kH, kW, in, out]
            _set(params, path + ("kernel",), np.ascontiguousarray(w.transpose(2, 3, 1, 0)))
        elif kind == "dense":  # [out, in] -> [in, out]
            _set(params, path + ("kernel",), np.ascontiguousarray(w.T))
        elif kind == "nin":  # [out, in, 1, 1] -> [in, out]
            _set(params, path + ("kernel",), np.ascontiguousarray(w[:, :, 0, 0].T))
        else:
            raise AssertionError(kind)
        _set(params, path + ("bias",), b.copy())

    for ours, (theirs, kind) in TINY_MODULES.items():
        if kind == "res":
            for sub, (their_sub, sub_kind) in RES_SUB.items():
                if f"{ours}.{sub}.weight" in state:
                    layer(f"{ours}.{sub}", (theirs, their_sub), sub_kind)
        elif kind == "attn":
            h = heads_of[ours]
            layer(f"{ours}.norm", (theirs, "norm"), "norm")
            w = state[f"{ours}.qkv.weight"].numpy()[:, :, 0, 0]  # (h * 3hd, C), per head [q, k, v]
            c = w.shape[1]
            hd = c // h
            w = w.reshape(h, 3 * hd, c)
            b = state[f"{ours}.qkv.bias"].numpy().reshape(h, 3 * hd)
            for n, x in enumerate("qkv"):
                # (h, hd, C) -> (C, h, hd); bias (h, hd)
                _set(params, (theirs, x, "kernel"),
                     np.ascontiguousarray(w[:, n * hd:(n + 1) * hd, :].transpose(2, 0, 1)))
                _set(params, (theirs, x, "bias"), np.ascontiguousarray(b[:, n * hd:(n + 1) * hd]))
            p = state[f"{ours}.proj.weight"].numpy()[:, :, 0, 0]  # (C_out, h * hd)
            _set(params, (theirs, "proj_out", "kernel"), np.ascontiguousarray(p.T.reshape(h, hd, c)))
            _set(params, (theirs, "proj_out", "bias"), state[f"{ours}.proj.bias"].numpy().copy())
        else:
            layer(ours, (theirs,), kind)
    return params


def tiny_checkpoint():
    unet = tiny_unet()
    state = identifying_state(unet)
    heads = {name: m.heads for name, m in unet.named_modules() if hasattr(m, "qkv")}
    assert heads == {"down.2.attn": 2, "mid.0.attn": 2, "up.0.attn": 2, "up.1.attn": 2}
    params = to_flax(state, heads)
    # A TrainState-like container: the raw optimizer target must NOT be picked over ema_params.
    decoy = {k: v for k, v in params.items()}
    decoy["conv_in"] = {"kernel": np.zeros_like(params["conv_in"]["kernel"]),
                        "bias": np.zeros_like(params["conv_in"]["bias"])}
    tree = {"step": 7, "optimizer": {"target": decoy, "state": {"step": np.int32(7)}},
            "ema_params": params, "num_sample_steps": 1024}
    return unet, state, tree


def _one_line_error(fn, *needles):
    with pytest.raises(ValueError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg, msg
    for needle in needles:
        assert needle in msg, (needle, msg)
    return msg


# --------------------------------------------------------------------------------------------


def test_import_tiny_every_value_lands_right(tmp_path):
    unet, expected, tree = tiny_checkpoint()
    path = tmp_path / "ckpt"
    write_flax_msgpack(path, tree)

    sd = load_google_pd(path, unet)
    assert set(sd) == set(unet.state_dict())
    for name, want in expected.items():
        got = sd[name]
        assert got.shape == want.shape and got.dtype == torch.float32, name
        assert torch.equal(got, want), name

    # Attention: per-head [q, k, v] layout, checked against the Flax tensors directly.
    qkv = sd["mid.0.attn.qkv.weight"]
    flax_attn = tree["ema_params"]["mid.attn_1"]
    hd = 8
    for head in range(2):
        for n, x in enumerate("qkv"):
            rows = qkv[head * 3 * hd + n * hd: head * 3 * hd + (n + 1) * hd, :, 0, 0]  # (hd, C)
            np.testing.assert_array_equal(rows.numpy(), flax_attn[x]["kernel"][:, head, :].T)

    # Strict load + forward on random input.
    unet2 = import_teacher(path, tiny_unet())
    for name, p in unet2.state_dict().items():
        assert torch.equal(p, expected[name]), name
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 8, 8, generator=g)
    with torch.no_grad():
        y = unet2(x, torch.tensor([-3.0, 5.0]), torch.tensor([0, 2]))
    assert y.shape == (2, 6, 8, 8) and torch.isfinite(y).all()


def test_flattened_dense_general_is_accepted():
    unet, expected, tree = tiny_checkpoint()
    attn = tree["ema_params"]["up_1.attn_1"]
    attn["q"]["kernel"] = attn["q"]["kernel"].reshape(16, 16)
    attn["k"]["bias"] = attn["k"]["bias"].reshape(16)
    attn["proj_out"]["kernel"] = attn["proj_out"]["kernel"].reshape(16, 16)
    sd = load_google_pd(tree, unet)
    for name in ("up.1.attn.qkv.weight", "up.1.attn.qkv.bias", "up.1.attn.proj.weight"):
        assert torch.equal(sd[name], expected[name]), name


def test_extra_missing_and_wrong_shape_are_one_line_errors():
    unet, _, tree = tiny_checkpoint()
    params = tree["ema_params"]

    params["down_1.attn_0"]["extra_thing"] = {"kernel": np.zeros(3, np.float32)}
    _one_line_error(lambda: load_google_pd(tree, unet), "1 Flax entries", "not used",
                    "down_1.attn_0/extra_thing/kernel", "not a CIFAR-10/ImageNet64 PD teacher")
    del params["down_1.attn_0"]["extra_thing"]

    saved = params["up_0.block_1"]["temb_proj"].pop("kernel")
    _one_line_error(lambda: load_google_pd(tree, unet), "1 Flax entries missing",
                    "up_0.block_1/temb_proj/kernel")
    params["up_0.block_1"]["temb_proj"]["kernel"] = saved

    good = params["down_1.block_0"]["conv1"]["kernel"]
    params["down_1.block_0"]["conv1"]["kernel"] = np.zeros((3, 3, 16, 8), np.float32)  # in/out swapped
    msg = _one_line_error(lambda: load_google_pd(tree, unet), "down.2.res.conv1.weight",
                          "down_1.block_0/conv1/kernel", "(3, 3, 16, 8)", "(3, 3, 8, 16)",
                          "not a CIFAR-10/ImageNet64 PD teacher")
    assert msg.startswith("shape mismatch")
    params["down_1.block_0"]["conv1"]["kernel"] = good
    load_google_pd(tree, unet)  # intact again

    # A checkpoint for another config (no class embedding in this UNet): left-over entry.
    no_class = UNet(**{**TINY, "num_classes": 1})
    _one_line_error(lambda: load_google_pd(tree, no_class), "class_emb/kernel")
    # No parameter dict at all.
    _one_line_error(lambda: load_google_pd({"step": 1, "ema_params": {}}, unet), "conv_in")


def test_msgpack_roundtrip_and_refusals(tmp_path):
    rng = np.random.default_rng(0)
    tree = {
        "f32": rng.standard_normal((2, 3, 4)).astype(np.float32),
        "f64": rng.standard_normal((5,)),
        "i32": np.arange(-6, 6, dtype=np.int32).reshape(3, 4),
        "bool": np.array([[True, False], [False, True]]),
        "empty": np.zeros((0, 3), np.float32),
        "nested": {"a.b": {"kernel": np.ones((1, 1, 2, 2), np.float32)}, "n": 3, "s": "x"},
        "scalar": np.float32(1.5),
        "tup": (np.int32(2), 3.0),
        "big_endian": np.arange(4, dtype=">f4"),
    }
    path = tmp_path / "t.msgpack"
    write_flax_msgpack(path, tree)
    back = read_flax_msgpack(path)
    for key in ("f32", "f64", "i32", "bool", "empty"):
        assert back[key].dtype == tree[key].dtype and back[key].shape == tree[key].shape, key
        np.testing.assert_array_equal(back[key], tree[key])
    np.testing.assert_array_equal(back["nested"]["a.b"]["kernel"], tree["nested"]["a.b"]["kernel"])
    assert back["nested"]["n"] == 3 and back["nested"]["s"] == "x"
    assert back["scalar"].shape == () and back["scalar"].dtype == np.float32 and back["scalar"] == 1.5
    assert isinstance(back["tup"], tuple) and back["tup"][0] == 2 and back["tup"][1] == 3.0
    np.testing.assert_array_equal(back["big_endian"], np.arange(4, dtype=np.float32))
    back["f32"][0, 0, 0] = 7.0  # arrays are writable copies

    # Chunked arrays (Flax splits leaves above 2**30 bytes) are re-assembled.
    chunked = {"w": {"__msgpack_chunked_array__": True, "shape": {"0": 2, "1": 3},
                     "chunks": {"0": np.arange(4, dtype=np.float32), "1": np.arange(4, 6, dtype=np.float32)}}}
    write_flax_msgpack(tmp_path / "c", chunked)
    np.testing.assert_array_equal(read_flax_msgpack(tmp_path / "c")["w"],
                                  np.arange(6, dtype=np.float32).reshape(2, 3))

    # bfloat16 (JAX) is widened to float32.
    bf = (np.array([1.0, -2.5, 0.15625], np.float32).view(np.uint32) >> 16).astype("<u2")
    payload = msgpack.packb(([3], "bfloat16", bf.tobytes()), use_bin_type=True)
    (tmp_path / "bf").write_bytes(msgpack.packb({"x": msgpack.ExtType(1, payload)}, use_bin_type=True))
    np.testing.assert_array_equal(read_flax_msgpack(tmp_path / "bf")["x"], [1.0, -2.5, 0.15625])

    # Ext code 2 (python complex) and complex arrays are refused; so is garbage.
    (tmp_path / "cx").write_bytes(msgpack.packb(
        {"z": msgpack.ExtType(2, msgpack.packb((1.0, 2.0)))}, use_bin_type=True))
    _one_line_error(lambda: read_flax_msgpack(tmp_path / "cx"), "complex")
    cpayload = msgpack.packb(([1], "complex64", b"\0" * 8), use_bin_type=True)
    (tmp_path / "ca").write_bytes(msgpack.packb({"z": msgpack.ExtType(1, cpayload)}, use_bin_type=True))
    _one_line_error(lambda: read_flax_msgpack(tmp_path / "ca"), "complex")
    opayload = msgpack.packb(([1], "object", b"\0" * 8), use_bin_type=True)
    (tmp_path / "ob").write_bytes(msgpack.packb({"z": msgpack.ExtType(1, opayload)}, use_bin_type=True))
    _one_line_error(lambda: read_flax_msgpack(tmp_path / "ob"), "not supported")
    (tmp_path / "junk").write_bytes(b"\xc1\x00garbage")
    _one_line_error(lambda: read_flax_msgpack(tmp_path / "junk"), "not a Flax msgpack checkpoint")
    with pytest.raises(ValueError, match="complex"):
        write_flax_msgpack(tmp_path / "w", {"z": np.zeros(2, np.complex64)})


# --------------------------------------------------------------------------------------------


def _expected_flax_shapes(transform, shape, heads):
    """Independent statement of the Flax shape rules."""
    if transform == "copy":
        return [tuple(shape)]
    if transform == "conv":
        return [(shape[2], shape[3], shape[1], shape[0])]
    if transform == "dense":
        return [(shape[1], shape[0])]
    if transform == "nin":
        assert shape[2:] == (1, 1)
        return [(shape[1], shape[0])]
    if transform == "qkv_kernel":
        assert shape[0] == 3 * shape[1] and shape[2:] == (1, 1)
        return [(shape[1], heads, shape[1] // heads)] * 3
    if transform == "qkv_bias":
        return [(heads, shape[0] // 3 // heads)] * 3
    if transform == "proj_kernel":
        assert shape[0] == shape[1] and shape[2:] == (1, 1)
        return [(heads, shape[0] // heads, shape[0])]
    raise AssertionError(transform)


@pytest.mark.parametrize("config,n_params", [(CIFAR10, 60_004_099), (IMAGENET64, 295_905_222)],
                         ids=["cifar10", "imagenet64"])
def test_real_configs_mapping_is_a_bijection(config, n_params):
    with torch.device("meta"):
        unet = UNet(**config)
    state = unet.state_dict()
    assert all(t.is_meta for t in state.values())
    mapping = google_pd_mapping(unet)

    rows = [(m.name, "/".join(p), s) for m in mapping for p, s in zip(m.flax_paths, m.flax_shapes)]
    ours = [m.name for m in mapping]
    flax = [r[1] for r in rows]
    assert len(ours) == len(set(ours)) and set(ours) == set(state)
    assert len(flax) == len(set(flax))
    for m in mapping:
        assert m.shape == tuple(state[m.name].shape)
        assert list(m.flax_shapes) == _expected_flax_shapes(m.transform, m.shape, m.heads), m.name
        assert sum(math.prod(s) for s in m.flax_shapes) == math.prod(m.shape), m.name
    assert sum(math.prod(s) for _, _, s in rows) == n_params == sum(t.numel() for t in state.values())

    by_path = {r[1]: r[2] for r in rows}
    modules = {p.split("/")[0] for p in flax}
    if config is CIFAR10:
        levels, attn_levels = 3, {1: 1, 2: 1}
        assert "class_emb/kernel" not in by_path
        assert by_path["conv_out/kernel"] == (3, 3, 256, 3)
        assert by_path["mid.attn_1/q/kernel"] == (256, 1, 256)
        assert by_path["mid.attn_1/proj_out/kernel"] == (1, 256, 256)
        # up_2.block_0 sees concat(256, 256): nin_shortcut 512 -> 256.
        assert by_path["up_2.block_0/nin_shortcut/kernel"] == (512, 256)
    else:
        levels, attn_levels = 4, {1: 6, 2: 9, 3: 12}
        assert by_path["class_emb/kernel"] == (1000, 768)
        assert by_path["conv_out/kernel"] == (3, 3, 192, 6)
        assert by_path["mid.attn_1/q/kernel"] == (768, 12, 64)
        assert by_path["down_1.attn_0/k/bias"] == (6, 64)
        assert by_path["up_1.attn_3/proj_out/kernel"] == (6, 64, 384)
        assert by_path["down_1.block_0/nin_shortcut/kernel"] == (192, 384)
        assert by_path["up_0.block_3/nin_shortcut/kernel"] == (384, 192)
    expected_modules = {"dense0", "dense1", "conv_in", "mid.block_1", "mid.attn_1", "mid.block_2",
                        "norm_out", "conv_out"} | ({"class_emb"} if config is IMAGENET64 else set())
    for i in range(levels):
        expected_modules |= {f"down_{i}.block_{j}" for j in range(3)}
        expected_modules |= {f"up_{i}.block_{j}" for j in range(4)}
        if i in attn_levels:
            expected_modules |= {f"down_{i}.attn_{j}" for j in range(3)}
            expected_modules |= {f"up_{i}.attn_{j}" for j in range(4)}
            h = attn_levels[i]
            c = by_path[f"down_{i}.attn_0/norm/scale"][0]
            assert by_path[f"down_{i}.attn_2/v/kernel"] == (c, h, c // h)
            assert by_path[f"up_{i}.attn_0/q/kernel"] == (c, h, c // h)
        if i != levels - 1:
            expected_modules.add(f"down_{i}.downsample")
        if i != 0:
            expected_modules.add(f"up_{i}.upsample")
    assert modules == expected_modules
