"""Read NVIDIA's EDM ``.pkl`` snapshots without running any code they contain (edm-notes §5).

The released files are plain pickles of ``dict(ema=…, loss_fn=…, augment_pipe=…, dataset_kwargs=…)``
whose networks are ``torch_utils.persistence`` objects: each one pickles as
``_reconstruct_persistent_obj(meta)`` where ``meta['module_src']`` is the full source of the module
that defines the class, and the real loader ``exec``s that source.  This loader never does:

- an allow-list :class:`pickle.Unpickler` resolves only the few globals such files need
  (edm-notes §5.3) and maps each one to an inert stand-in; every other global is refused with
  :class:`UnsafePickleError` before anything is called;
- a persistent object becomes a :class:`PersistentRecord` (class name, version, state, and only
  the sha256 and length of ``module_src``), a ``torch.nn.ModuleDict`` an :class:`InertModuleDict`;
- tensor storages are inlined legacy ``torch.save`` blobs, parsed here byte by byte (their header
  pickles with an empty allow-list, the storage pickle allowing only ``torch.<X>Storage``);
- the state dict is rebuilt from the records of ``data['ema']`` in PyTorch's own order.

Neither ``torch_utils`` nor ``dnnlib`` is ever imported.  The keys are EDMPrecond's
(``model.…``): load them into :class:`~tract_repro.networks.edm_denoiser.EDMDenoiser`'s ``net``.
"""
import hashlib
import io
import os
import pickle
import struct
import sys
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

from tract_repro.common.errors import ConfigError
from tract_repro.common.files import sha256

URL_PREFIX = "https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/"

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001

#: the storage classes a legacy blob may name, and their dtypes (edm-notes §5.3)
STORAGE_DTYPES = {
    "FloatStorage": torch.float32,
    "DoubleStorage": torch.float64,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}


class UnsafePickleError(ConfigError):
    """A pickle asked for something an NVIDIA EDM snapshot never needs; nothing was run."""


@dataclass
class EDMCheckpoint:
    """The ``ema`` network of an EDM snapshot, as tensors and inert metadata."""

    state_dict: "OrderedDict[str, torch.Tensor]"
    init_kwargs: dict
    class_name: str
    sha256: str
    module_src_sha256: str | None = None


@dataclass
class PersistentRecord:
    """What ``torch_utils.persistence`` stored for one object, minus its source code (never run)."""

    class_name: str
    version: object
    state: object
    module_src_sha256: str | None = None
    module_src_len: int = 0


class InertModuleDict:
    """Stands in for ``torch.nn.ModuleDict``: keeps the pickled ``__dict__`` and nothing else."""

    def __init__(self, *args, **kwargs):
        self.state = {}

    def __setstate__(self, state):
        self.state = state

    def __repr__(self):
        return f"InertModuleDict({list(self.state.get('_modules', {}))})"


@dataclass
class _StorageTag:
    dtype: torch.dtype
    name: str


@dataclass
class _StorageRef:
    """A legacy persistent id ('storage', type, key, location, numel, view_metadata)."""

    tag: _StorageTag
    key: str
    location: str
    numel: int


def _refusal(what, path):
    return UnsafePickleError(
        f"refusing to load {what} from {path}: NVIDIA EDM pickles only need tensors and inert records")


# ---------------------------------------------------------------- the inlined legacy storage blobs


class _HeaderUnpickler(pickle.Unpickler):
    """For the header pickles of a legacy blob: plain data only, no globals, no persistent ids."""

    def __init__(self, file, path):
        super().__init__(file)
        self._path = path

    def find_class(self, module, name):
        raise _refusal(f"{module}.{name} (inside a tensor storage)", self._path)

    def persistent_load(self, pid):
        raise _refusal("a persistent id (inside a tensor storage header)", self._path)


class _StorageUnpickler(_HeaderUnpickler):
    """The storage pickle of a legacy blob: only ``torch.<X>Storage`` globals and one persistent id."""

    def find_class(self, module, name):
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageTag(STORAGE_DTYPES[name], name)
        raise _refusal(f"{module}.{name} (inside a tensor storage)", self._path)

    def persistent_load(self, pid):
        ok = (isinstance(pid, tuple) and len(pid) == 6 and pid[0] == "storage" and isinstance(pid[1], _StorageTag)
              and isinstance(pid[2], str) and isinstance(pid[3], str) and isinstance(pid[4], int)
              and pid[4] >= 0 and pid[5] is None)
        if not ok:
            raise _refusal(f"the persistent id {pid!r:.80} (inside a tensor storage)", self._path)
        return _StorageRef(pid[1], pid[2], pid[3], pid[4])


def _bad_blob(path, why):
    return ValueError(f"corrupt tensor storage in {path}: {why}")


def parse_legacy_storage(blob, path="<bytes>"):
    """A flat tensor from a legacy (non-zip) ``torch.save`` of one storage (edm-notes §5.1), on CPU.

    Layout: pickled magic number, protocol 1001, sys-info dict, the storage pickle (one persistent
    id ('storage', torch.<X>Storage, key, location, numel, None)), the key list, then per key an
    int64 little-endian element count and the raw little-endian bytes.
    """
    if not isinstance(blob, (bytes, bytearray)):
        raise _bad_blob(path, f"expected bytes, got {type(blob).__name__}")
    f = io.BytesIO(blob)
    try:
        magic = _HeaderUnpickler(f, path).load()
        protocol = _HeaderUnpickler(f, path).load()
        sys_info = _HeaderUnpickler(f, path).load()
        if magic != _LEGACY_MAGIC or protocol != _LEGACY_PROTOCOL:
            raise _bad_blob(path, f"not a legacy torch.save blob (magic {magic!r}, protocol {protocol!r})")
        if not isinstance(sys_info, dict) or sys_info.get("little_endian") is not True:
            raise _bad_blob(path, "only little-endian storages are supported")
        ref = _StorageUnpickler(f, path).load()
        keys = _HeaderUnpickler(f, path).load()
    except (pickle.UnpicklingError, EOFError) as e:
        raise _bad_blob(path, f"{type(e).__name__}: {e}") from None
    if not isinstance(ref, _StorageRef) or keys != [ref.key]:
        raise _bad_blob(path, "expected exactly one storage")
    head = f.read(8)
    if len(head) != 8:
        raise _bad_blob(path, "storage truncated before its element count")
    (count,) = struct.unpack("<q", head)
    itemsize = torch.empty((), dtype=ref.tag.dtype).element_size()
    if count != ref.numel:
        raise _bad_blob(path, f"storage holds {count} elements but its header says {ref.numel}")
    raw = f.read(count * itemsize)
    if len(raw) != count * itemsize:
        raise _bad_blob(path, f"storage truncated ({len(raw)} of {count * itemsize} bytes)")
    if sys.byteorder != "little":
        raise _bad_blob(path, "this loader needs a little-endian machine")
    if count == 0:
        return torch.empty(0, dtype=ref.tag.dtype)
    return torch.frombuffer(bytearray(raw), dtype=ref.tag.dtype)


# ---------------------------------------------------------------- the safe stand-ins for the globals


def _reconstruct_persistent_obj(meta):
    """An inert :class:`PersistentRecord` of a persistence meta dict; ``module_src`` is hashed, never run."""
    if not isinstance(meta, dict) or meta.get("type") != "class" or not isinstance(meta.get("class_name"), str):
        raise ConfigError(f"unexpected torch_utils.persistence record: {str(meta)[:80]!r}")
    src = meta.get("module_src")
    digest, length = None, 0
    if isinstance(src, str):
        digest, length = hashlib.sha256(src.encode("utf-8")).hexdigest(), len(src)
    return PersistentRecord(meta["class_name"], meta.get("version"), meta.get("state"), digest, length)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None):
    """as_strided(storage, size, stride, offset).clone(); the 6- and 7-argument forms."""
    if not isinstance(storage, torch.Tensor) or storage.ndim != 1:
        raise ConfigError("a pickled tensor does not reference a storage")
    if metadata:
        raise ConfigError(f"unsupported tensor metadata in an EDM pickle: {metadata!r:.80}")
    size, stride, offset = tuple(int(s) for s in size), tuple(int(s) for s in stride), int(storage_offset)
    if len(size) != len(stride) or offset < 0 or any(s < 0 for s in size + stride):
        raise ConfigError(f"bad tensor geometry in an EDM pickle: size {size}, stride {stride}, offset {offset}")
    if all(size):
        last = offset + sum((n - 1) * st for n, st in zip(size, stride))
        if last >= storage.numel():
            raise ConfigError(f"tensor of size {size} overruns its storage of {storage.numel()} elements")
    elif offset > storage.numel():
        raise ConfigError("tensor offset beyond its storage")
    if not all(size):
        return torch.empty(size, dtype=storage.dtype)
    return torch.as_strided(storage, size, stride, offset).clone()


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
    """A Parameter becomes its plain data tensor."""
    return data


def _rebuild_parameter_with_state(data, requires_grad=False, backward_hooks=None, state=None):
    """A Parameter with extra state becomes its plain data tensor (the state is dropped)."""
    return data


def _numpy_scalar(dtype, data=None):
    """A numpy scalar (dtype, raw bytes) → a Python float/int/bool/complex via frombuffer."""
    if not isinstance(dtype, np.dtype) or dtype.hasobject or dtype.kind not in "biufc":
        raise ConfigError(f"unsupported numpy scalar dtype in an EDM pickle: {dtype!r:.40}")
    if not isinstance(data, (bytes, bytearray)) or len(data) != dtype.itemsize:
        raise ConfigError("malformed numpy scalar in an EDM pickle")
    return np.frombuffer(bytes(data), dtype=dtype)[0].item()


def _numpy_dtype(spec, align=False, copy=False):
    """numpy.dtype for plain numeric type codes only (BUILD then runs dtype's own setstate)."""
    if not isinstance(spec, str) or len(spec) > 8:
        raise ConfigError(f"unsupported numpy dtype in an EDM pickle: {spec!r:.40}")
    dt = np.dtype(spec)
    if dt.hasobject or dt.kind not in "biufc":
        raise ConfigError(f"unsupported numpy dtype in an EDM pickle: {spec!r}")
    return dt


_ALLOWED = {
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _reconstruct_persistent_obj,
    ("torch.nn.modules.container", "ModuleDict"): InertModuleDict,
    ("collections", "OrderedDict"): OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter_with_state,
    ("torch.storage", "_load_from_bytes"): parse_legacy_storage,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,
    ("numpy", "dtype"): _numpy_dtype,
    ("builtins", "set"): set,
    ("dnnlib.util", "EasyDict"): dict,
}


class EDMUnpickler(pickle.Unpickler):
    """Resolves only the globals of edm-notes §5.3, each to an inert stand-in; refuses the rest.

    Each load gets fresh wrapper functions (and a fresh ModuleDict stand-in class), so a file that
    BUILDs attributes onto a resolved global cannot alter this module or a later load.
    """

    def __init__(self, file, path):
        super().__init__(file)
        self._path = path
        module_dict = type("InertModuleDict", (InertModuleDict,), {})
        self._resolved = {}
        for key, target in _ALLOWED.items():
            if target is InertModuleDict:
                self._resolved[key] = module_dict
            elif target is parse_legacy_storage:
                self._resolved[key] = lambda blob: parse_legacy_storage(blob, path)
            elif target in (OrderedDict, set, dict):
                self._resolved[key] = target  # built-in types: their attributes cannot be set
            else:
                self._resolved[key] = (lambda fn: lambda *a, **k: fn(*a, **k))(target)

    def find_class(self, module, name):
        target = self._resolved.get((module, name))
        if target is None:
            raise _refusal(f"{module}.{name}", self._path)
        return target

    def persistent_load(self, pid):
        raise _refusal(f"the persistent id {pid!r:.80}", self._path)


# ---------------------------------------------------------------- the state dict


def _module_state(node, where):
    state = node.state
    if not isinstance(state, dict) or not all(k in state for k in ("_parameters", "_buffers", "_modules")):
        name = node.class_name if isinstance(node, PersistentRecord) else "ModuleDict"
        raise ConfigError(f"{where or 'the ema network'} ({name}) is not a torch Module record")
    return state


def state_dict_of(record, prefix=""):
    """The state dict of an inert module record, in PyTorch's order.

    Own ``_parameters`` (skipping None), then ``_buffers`` (skipping None and the names in
    ``_non_persistent_buffers_set``), then each child in ``_modules`` order with ``name.`` prefixed.
    """
    out = OrderedDict()
    _collect(record, prefix, out, set())
    return out


def _collect(node, prefix, out, ancestors):
    if id(node) in ancestors:
        raise ConfigError(f"module {prefix.rstrip('.')} contains itself")
    state = _module_state(node, prefix.rstrip("."))
    skip = state.get("_non_persistent_buffers_set") or set()
    for kind, items in (("parameter", state["_parameters"]), ("buffer", state["_buffers"])):
        for name, value in items.items():
            if value is None or (kind == "buffer" and name in skip):
                continue
            if not isinstance(value, torch.Tensor):
                raise ConfigError(f"{kind} {prefix}{name} is a {type(value).__name__}, not a tensor")
            out[prefix + name] = value
    for name, child in state["_modules"].items():
        if child is None:
            continue
        if not isinstance(child, (PersistentRecord, InertModuleDict)):
            raise ConfigError(f"submodule {prefix}{name} is a {type(child).__name__}, not a module record")
        _collect(child, f"{prefix}{name}.", out, ancestors | {id(node)})


def _plain(value):
    """Init kwargs as plain Python containers (EasyDicts already arrive as dicts)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    return value


def load_edm_pickle(path, key="ema"):
    """The ``ema`` network of an NVIDIA EDM ``.pkl`` as an :class:`EDMCheckpoint`, running none of its code.

    Raises :class:`UnsafePickleError` (one line) for any global outside the allow-list and
    ``FileNotFoundError`` (one line, with the download URL) for a missing file.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        name = os.path.splitext(os.path.basename(path))[0] or "<name>"
        raise FileNotFoundError(
            f"EDM checkpoint {path} not found: download {URL_PREFIX}{name}.pkl and put it at {path}")
    digest = sha256(path)
    with open(path, "rb") as f:
        try:
            data = EDMUnpickler(f, path).load()
        except UnsafePickleError:
            raise
        except (ValueError, pickle.UnpicklingError, EOFError, AttributeError, TypeError, IndexError,
                KeyError, RecursionError) as e:
            msg = " ".join(str(e).split())
            if path in msg:
                raise ConfigError(msg) from None
            raise ConfigError(f"{path} is not a readable EDM pickle: {type(e).__name__}: {msg}") from None
    if not isinstance(data, dict) or key not in data:
        raise ConfigError(f"{path} holds no {key!r} network: expected NVIDIA's snapshot dict(ema=..., ...)")
    record = data[key]
    if not isinstance(record, PersistentRecord):
        raise ConfigError(f"{path}: {key!r} is a {type(record).__name__}, not a torch_utils.persistence record")
    try:
        state_dict = state_dict_of(record)
    except (ValueError, AttributeError, TypeError, RecursionError) as e:
        raise ConfigError(f"{path}: the {key!r} network is not a module tree: {e}") from None
    kwargs = record.state.get("_init_kwargs", {}) if isinstance(record.state, dict) else {}
    return EDMCheckpoint(state_dict=state_dict, init_kwargs=_plain(dict(kwargs or {})),
                         class_name=record.class_name, sha256=digest,
                         module_src_sha256=record.module_src_sha256)
