"""The safe loader for NVIDIA's EDM ``.pkl`` snapshots (edm-notes §5): tensors come back, code never runs.

The test writes a snapshot in NVIDIA's format: ``torch_utils.persistence``-style objects pickled as
``_reconstruct_persistent_obj(meta)`` (meta carries ``module_src``), a plain ``torch.nn.ModuleDict``,
Parameters through ``_rebuild_parameter``, tensors through ``_rebuild_tensor_v2`` and storages as
``torch.storage._load_from_bytes(<legacy torch.save blob>)``.  The fake ``torch_utils``/``dnnlib``
modules exist in ``sys.modules`` only while writing.
"""
import hashlib
import io
import pickle
import pickletools
import sys
import types
from collections import OrderedDict

import numpy as np
import pytest
import torch
from torch import nn

from tract_repro.networks.edm_denoiser import EDMDenoiser
from tract_repro.networks.edm_pickle import UnsafePickleError, load_edm_pickle, parse_legacy_storage

ALLOWED_GLOBALS = {  # edm-notes §5.3
    ("torch_utils.persistence", "_reconstruct_persistent_obj"), ("torch.nn.modules.container", "ModuleDict"),
    ("collections", "OrderedDict"), ("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_parameter"),
    ("torch._utils", "_rebuild_parameter_with_state"), ("torch.storage", "_load_from_bytes"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"), ("numpy", "dtype"),
    ("builtins", "set"), ("dnnlib.util", "EasyDict"),
}
FAKE_MODULES = ("torch_utils", "torch_utils.persistence", "dnnlib", "dnnlib.util")


def module_src_for(marker):
    """Source text that would leave a marker file (and exit) if anything ever executed it."""
    return (f"import pathlib\npathlib.Path({str(marker)!r}).write_text('module_src ran')\n"
            "raise SystemExit('module_src executed')\n")


# ------------------------------------------------------------------ writing NVIDIA's format


def install_fake_modules(marker):
    """torch_utils.persistence (with _reconstruct_persistent_obj) and dnnlib.util.EasyDict, for pickling only."""
    persistence = types.ModuleType("torch_utils.persistence")

    def _reconstruct_persistent_obj(meta):  # what the real loader would do: run module_src
        with open(marker, "w") as f:
            f.write("reconstruct ran")
        exec(meta["module_src"], {})  # noqa: S102 - never reached: the loader maps this global

    _reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    persistence._reconstruct_persistent_obj = _reconstruct_persistent_obj
    torch_utils = types.ModuleType("torch_utils")
    torch_utils.persistence = persistence
    util = types.ModuleType("dnnlib.util")

    class EasyDict(dict):
        def __getattr__(self, name):
            return self[name]

    EasyDict.__module__, EasyDict.__qualname__ = "dnnlib.util", "EasyDict"
    util.EasyDict = EasyDict
    dnnlib = types.ModuleType("dnnlib")
    dnnlib.util = util
    for name, mod in zip(FAKE_MODULES, (torch_utils, persistence, dnnlib, util)):
        sys.modules[name] = mod
    return persistence, EasyDict


def remove_fake_modules():
    for name in FAKE_MODULES:
        sys.modules.pop(name, None)


class Persistent:
    """Pickles like a ``@persistent_class`` object: ``_reconstruct_persistent_obj(meta)``, no state."""

    class_name = "?"
    module_src = ""

    def __reduce_ex__(self, protocol):
        meta = dict(type="class", version=6, module_src=self.module_src, class_name=self.class_name,
                    state=dict(self.__dict__))
        return sys.modules["torch_utils.persistence"]._reconstruct_persistent_obj, (meta,)


class Embedding(Persistent, nn.Module):
    class_name = "FourierEmbedding"

    def __init__(self):
        super().__init__()
        self.register_buffer("freqs", torch.tensor([0.5, -0.0, float("nan"), 16.25]))


class Conv(Persistent, nn.Module):
    class_name = "Conv2d"

    def __init__(self, bias=True):
        super().__init__()
        self.register_buffer("resample_filter", torch.full((1, 1, 2, 2), 0.25))  # a buffer before parameters
        g = torch.Generator().manual_seed(0)
        self.weight = nn.Parameter(torch.randn(2, 1, 3, 3, generator=g))
        self.bias = nn.Parameter(torch.randn(2, generator=g).half()) if bias else None


class Block(Persistent, nn.Module):
    class_name = "UNetBlock"

    def __init__(self):
        super().__init__()
        self.norm0 = Conv(bias=False)
        self.register_buffer("counts", torch.tensor([1, -2, 2 ** 40], dtype=torch.int64))
        self.register_buffer("cache", torch.ones(3), persistent=False)  # must not appear
        self.register_buffer("mask", torch.tensor([True, False, True]))
        self.register_buffer("gone", None)
        big = torch.arange(24, dtype=torch.float64).reshape(4, 6)
        self.register_buffer("view", big[1:, ::2].t())  # offset + non-contiguous strides
        self.scale = nn.Parameter(torch.tensor([1.5, 2.5], dtype=torch.bfloat16))
        self.scale._with_state = True  # pickled through _rebuild_parameter_with_state
        self.skip_scale = np.float64(np.sqrt(0.5))


class Net(Persistent, nn.Module):
    class_name = "SongUNet"

    def __init__(self):
        super().__init__()
        self.map_noise = Embedding()
        self.enc = nn.ModuleDict({"8x8_conv": Conv(), "8x8_block0": Block()})
        self.out = Conv()
        self.register_parameter("unused", None)


class Precond(Persistent, nn.Module):
    class_name = "EDMPrecond"

    def __init__(self):
        super().__init__()
        self.img_resolution, self.label_dim, self.use_fp16 = 8, 0, False
        self.sigma_min, self.sigma_max, self.sigma_data = 0, float("inf"), 0.5
        self.model = Net()
        self._init_args = ()
        self._init_kwargs = dict(model_type="SongUNet", channel_mult=[2, 2, 2], use_fp16=False,
                                 skip_scale=np.float64(np.sqrt(0.5)), img_channels=np.int64(3),
                                 dropout=np.float32(0.125), resample_filter=[1, 3, 3, 1])


class Loss(Persistent):
    class_name = "EDMLoss"

    def __init__(self):
        self.P_mean, self.P_std, self.sigma_data = -1.2, 1.2, 0.5


def _reduce_storage(storage):
    buf = io.BytesIO()
    torch.save(storage, buf, _use_new_zipfile_serialization=False)
    return torch.storage._load_from_bytes, (buf.getvalue(),)


def _typed_storage(t):
    return torch.storage.TypedStorage(wrap_storage=t.untyped_storage(), dtype=t.dtype, _internal=True)


def _reduce_tensor(t):
    args = (_typed_storage(t), t.storage_offset(), tuple(t.size()), t.stride(), t.requires_grad, OrderedDict())
    if t.dtype == torch.float16:
        args += ({},)  # the 7-argument form of newer writers
    return torch._utils._rebuild_tensor_v2, args


def _reduce_parameter(p):
    if getattr(p, "_with_state", False):
        return torch._utils._rebuild_parameter_with_state, (p.data, p.requires_grad, OrderedDict(), dict(p.__dict__))
    return torch._utils._rebuild_parameter, (p.data, p.requires_grad, OrderedDict())


class EDMStylePickler(pickle.Pickler):
    dispatch_table = {torch.storage.TypedStorage: _reduce_storage, torch.Tensor: _reduce_tensor,
                      nn.Parameter: _reduce_parameter}


class TorchDefaultPickler(pickle.Pickler):
    """Plain pickling with torch's own reductions, as NVIDIA's training loop did."""


def write_snapshot(path, marker, protocol=4, pickler=EDMStylePickler):
    """An EDM-style snapshot dict(ema, loss_fn, augment_pipe, dataset_kwargs); returns (ema module, module_src)."""
    _, EasyDict = install_fake_modules(marker)
    try:
        src = module_src_for(marker)
        for cls in (Embedding, Conv, Block, Net, Precond, Loss):
            cls.module_src = src
        torch.manual_seed(0)
        ema = Precond().eval().requires_grad_(False)
        data = dict(ema=ema, loss_fn=Loss(), augment_pipe=None,
                    dataset_kwargs=EasyDict(class_name="training.dataset.ImageFolderDataset", xflip=False))
        with open(path, "wb") as f:
            pickler(f, protocol=protocol).dump(data)
    finally:
        remove_fake_modules()
    return ema, src


def globals_in(path):
    """The (module, name) globals a pickle references, read opcode by opcode (nothing is run)."""
    found, pushed, memo = set(), [None], {}
    with open(path, "rb") as f:
        for op, arg, _ in pickletools.genops(f):
            if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE", "BINUNICODE8"):
                pushed.append(arg)
            elif op.name == "MEMOIZE":
                memo[len(memo)] = pushed[-1]
            elif op.name in ("PUT", "BINPUT", "LONG_BINPUT"):
                memo[arg] = pushed[-1]
            elif op.name in ("GET", "BINGET", "LONG_BINGET"):
                pushed.append(memo.get(arg))
            elif op.name == "STACK_GLOBAL":
                found.add((pushed[-2], pushed[-1]))
                pushed.append(None)
            elif op.name in ("GLOBAL", "INST"):
                found.add(tuple(arg.split(" ", 1)))
                pushed.append(None)
            else:
                pushed.append(None)
    return found


def raw_bytes(t):
    return t.contiguous().reshape(-1).view(torch.uint8)


def assert_no_code_ran(marker):
    assert not marker.exists()
    assert not any(m == "torch_utils" or m.startswith(("torch_utils.", "dnnlib", "_imported_module_"))
                   for m in sys.modules)


# ----------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("protocol,pickler", [(3, EDMStylePickler), (4, EDMStylePickler), (4, TorchDefaultPickler)])
def test_snapshot_loads_bit_exact_without_running_code(tmp_path, protocol, pickler):
    path, marker = tmp_path / "edm-test.pkl", tmp_path / "ran.txt"
    ema, src = write_snapshot(path, marker, protocol, pickler)
    assert not any(m in sys.modules for m in FAKE_MODULES)
    refs = globals_in(path)
    assert ("torch_utils.persistence", "_reconstruct_persistent_obj") in refs
    assert ("torch.storage", "_load_from_bytes") in refs and ("torch.nn.modules.container", "ModuleDict") in refs
    assert ("torch._utils", "_rebuild_parameter_with_state") in refs and ("dnnlib.util", "EasyDict") in refs
    assert refs <= ALLOWED_GLOBALS

    ckpt = load_edm_pickle(path)

    expected = ema.state_dict()
    assert list(ckpt.state_dict) == list(expected)
    assert "model.enc.8x8_block0.cache" not in ckpt.state_dict and "model.unused" not in ckpt.state_dict
    assert list(ckpt.state_dict)[:4] == ["model.map_noise.freqs", "model.enc.8x8_conv.weight",
                                         "model.enc.8x8_conv.bias", "model.enc.8x8_conv.resample_filter"]
    for key, value in expected.items():
        got = ckpt.state_dict[key]
        assert type(got) is torch.Tensor and not got.requires_grad, key
        assert got.dtype == value.dtype and got.shape == value.shape, key
        assert torch.equal(raw_bytes(got), raw_bytes(value)), key
    assert {v.dtype for v in ckpt.state_dict.values()} >= {torch.float32, torch.float16, torch.bfloat16,
                                                            torch.int64, torch.bool, torch.float64}

    assert ckpt.class_name == "EDMPrecond"
    assert ckpt.init_kwargs == dict(model_type="SongUNet", channel_mult=[2, 2, 2], use_fp16=False,
                                    skip_scale=float(np.sqrt(0.5)), img_channels=3, dropout=0.125,
                                    resample_filter=[1, 3, 3, 1])
    assert type(ckpt.init_kwargs["skip_scale"]) is float and type(ckpt.init_kwargs["img_channels"]) is int
    assert ckpt.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert ckpt.module_src_sha256 == hashlib.sha256(src.encode()).hexdigest()
    assert_no_code_ran(marker)

    # the pickle's model.… keys load strictly into an EDMDenoiser's net
    fresh = Precond()
    for p in fresh.parameters():
        p.data.zero_()
    den = EDMDenoiser(fresh)
    den.net.load_state_dict(ckpt.state_dict)
    assert list(den.state_dict()) == ["net." + k for k in expected]
    assert torch.equal(den.net.model.enc["8x8_conv"].weight, expected["model.enc.8x8_conv.weight"])


def test_legacy_storage_blob_parser_matches_torch():
    for t in (torch.arange(5, dtype=torch.float16), torch.tensor([True, False]), torch.zeros(0),
              torch.arange(-3, 3, dtype=torch.int8), torch.tensor([1.25, -2.0], dtype=torch.bfloat16)):
        buf = io.BytesIO()
        torch.save(_typed_storage(t), buf, _use_new_zipfile_serialization=False)
        flat = parse_legacy_storage(buf.getvalue())
        assert flat.dtype == t.dtype and torch.equal(flat, t.reshape(-1))


def crafted(module, name, arg):
    """{'ema': module.name(arg)} written opcode by opcode (protocol 2): a GLOBAL, its argument tuple, REDUCE."""
    args = pickle.dumps((arg,), protocol=2)[2:-1]  # drop PROTO and STOP
    return (b"\x80\x02}q\x00X\x03\x00\x00\x00emaq\x01c" + f"{module}\n{name}\n".encode() + args + b"R" + b"s.")


@pytest.mark.parametrize("module,name,kind", [
    ("os", "system", "shell"), ("posix", "system", "shell"), ("builtins", "eval", "python"),
    ("builtins", "exec", "python"), ("subprocess", "Popen", "argv"), ("torch_utils.persistence", "import_hook", "python"),
])
def test_code_execution_is_refused(tmp_path, module, name, kind):
    marker = tmp_path / "pwned.txt"
    arg = {"shell": f"touch {marker}", "python": f"open({str(marker)!r}, 'w').close()",
           "argv": ["touch", str(marker)]}[kind]
    path = tmp_path / "evil.pkl"
    path.write_bytes(crafted(module, name, arg))
    assert (module, name) in globals_in(path)
    with pytest.raises(UnsafePickleError) as err:
        load_edm_pickle(path)
    msg = str(err.value)
    assert "\n" not in msg and f"refusing to load {module}.{name} from {path}" in msg
    assert "NVIDIA EDM pickles only need tensors and inert records" in msg
    assert not marker.exists()
    assert_no_code_ran(marker)


def test_refuses_code_inside_a_storage_blob_and_persistent_ids(tmp_path):
    marker = tmp_path / "pwned.txt"
    buf = io.BytesIO()
    torch.save(_typed_storage(torch.ones(2)), buf, _use_new_zipfile_serialization=False)
    blob = buf.getvalue()
    assert b"ctorch\nFloatStorage\n" in blob
    evil_blob = blob.replace(b"ctorch\nFloatStorage\n", b"cos\nsystem\n")

    class EvilStorage:
        def __reduce__(self):
            return torch.storage._load_from_bytes, (evil_blob,)

    path = tmp_path / "evil-blob.pkl"
    path.write_bytes(pickle.dumps({"ema": EvilStorage()}, protocol=4))
    with pytest.raises(UnsafePickleError, match=r"refusing to load os\.system \(inside a tensor storage\)") as err:
        load_edm_pickle(path)
    assert "\n" not in str(err.value) and not marker.exists()

    path = tmp_path / "persid.pkl"
    path.write_bytes(b"\x80\x02X\x03\x00\x00\x00abcQ.")  # a BINPERSID
    with pytest.raises(UnsafePickleError, match="persistent id") as err:
        load_edm_pickle(path)
    assert "\n" not in str(err.value)


def test_missing_file_is_one_line(tmp_path):
    path = tmp_path / "edm-cifar10-32x32-uncond-ve.pkl"
    with pytest.raises(FileNotFoundError) as err:
        load_edm_pickle(path)
    msg = str(err.value)
    assert "\n" not in msg
    assert msg == (f"EDM checkpoint {path} not found: download "
                   f"https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/edm-cifar10-32x32-uncond-ve.pkl and put it at {path}")


def test_allow_list_and_numpy1_scalars():
    from tract_repro.networks import edm_pickle

    assert set(edm_pickle._ALLOWED) == ALLOWED_GLOBALS
    raw = pickle.dumps({"skip_scale": np.float64(np.sqrt(0.5)), "n": np.int64(7), "s": {1, 2}}, protocol=3)
    raw = raw.replace(b"cnumpy._core.multiarray\nscalar\n", b"cnumpy.core.multiarray\nscalar\n")
    assert b"cnumpy.core.multiarray\nscalar\n" in raw and b"cbuiltins\nset\n" in raw  # numpy 1.x writer, protocol 3
    out = edm_pickle.EDMUnpickler(io.BytesIO(raw), "<test>").load()
    assert out == {"skip_scale": float(np.sqrt(0.5)), "n": 7, "s": {1, 2}}
    assert type(out["skip_scale"]) is float and type(out["n"]) is int


def test_truncated_or_foreign_files_fail_in_one_line(tmp_path):
    path, marker = tmp_path / "edm-test.pkl", tmp_path / "ran.txt"
    write_snapshot(path, marker)
    cut = tmp_path / "cut.pkl"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError) as err:
        load_edm_pickle(cut)
    assert "\n" not in str(err.value) and str(cut) in str(err.value)
    other = tmp_path / "other.pkl"
    other.write_bytes(pickle.dumps({"net": [1, 2]}))
    with pytest.raises(ValueError, match="holds no 'ema' network"):
        load_edm_pickle(other)
    assert_no_code_ran(marker)
