"""Read and write Flax checkpoints (msgpack) without JAX, Flax or TensorFlow.

Flax serialization format (``flax.serialization.msgpack_serialize``)
---------------------------------------------------------------------
The file is a msgpack document holding a nested dict with string keys. Leaves are
python scalars / strings or msgpack *extension types*:

* code 1, ndarray: payload = msgpack of ``(shape: list[int], dtype_name: str, raw_bytes)``,
  the bytes in C order, native (little-endian) byte order. ``bfloat16`` arrays are
  widened to float32 here (numpy has no bfloat16).
* code 2, native python complex: refused (no teacher parameter is complex).
* code 3, numpy scalar: payload as for code 1 with ``shape == []``; decoded to a 0-d array.
* code 4, tuple (newer Flax): payload = msgpack of a list, decoded recursively to a tuple.
* Arrays above 2**30 bytes are stored "chunked" as
  ``{'__msgpack_chunked_array__': True, 'shape': {'0': ...}, 'chunks': {'0': arr, ...}}``
  and are re-assembled on reading.

Complex dtypes and object arrays are refused with a ``ValueError``. Nothing is ever
unpickled. The PD checkpoints are serialized ``TrainState`` objects: the teacher weights are
the EMA parameters under ``ema_params`` (the raw ``optimizer/target`` parameters, if present,
are *not* the teacher). :func:`find_teacher_params` looks for ``ema_params`` first, then
``params``, then ``target``, then any mapping that holds a ``conv_in`` module (breadth first).
"""
from __future__ import annotations

import math
import os
from typing import Any, Mapping

import msgpack
import numpy as np

from tract_repro.common.errors import ConfigError
from tract_repro.common.files import write_atomic


_EXT_NDARRAY, _EXT_COMPLEX, _EXT_NPSCALAR, _EXT_TUPLE = 1, 2, 3, 4
_CHUNKED = "__msgpack_chunked_array__"
_MAX_CHUNK_BYTES = 2 ** 30


class FlaxFormatError(ConfigError):
    """A file or tree that is not (supported) Flax msgpack."""


def _dtype(name: Any) -> np.dtype:
    if isinstance(name, bytes):
        name = name.decode("ascii")
    if not isinstance(name, str):
        raise FlaxFormatError(f"Flax msgpack: bad dtype name {name!r}")
    try:
        dt = np.dtype(name)
    except TypeError as e:
        raise FlaxFormatError(f"Flax msgpack: unknown dtype {name!r}") from e
    if dt.kind == "c":
        raise FlaxFormatError(f"Flax msgpack: complex arrays ({name}) are not supported")
    if dt.kind not in "biuf":
        raise FlaxFormatError(f"Flax msgpack: dtype {name!r} is not supported (numeric and bool only)")
    return dt


def _array_from_payload(data: bytes) -> np.ndarray:
    # raw=True: the dtype name may be a str or a bin object depending on the msgpack version.
    shape, name, buf = msgpack.unpackb(data, raw=True)
    shape = tuple(int(s) for s in shape)
    name_s = name.decode("ascii") if isinstance(name, bytes) else name
    count = math.prod(shape)
    if name_s == "bfloat16":
        if len(buf) != 2 * count:
            raise FlaxFormatError(f"Flax msgpack: {len(buf)} bytes for a bfloat16 array of shape {shape}")
        bits = np.frombuffer(buf, dtype="<u2").astype(np.uint32) << 16
        return bits.view(np.float32).reshape(shape)
    dt = _dtype(name_s)
    if len(buf) != count * dt.itemsize:
        raise FlaxFormatError(f"Flax msgpack: {len(buf)} bytes for a {name_s} array of shape {shape}")
    return np.frombuffer(buf, dtype=dt).reshape(shape).copy()


def _ext_hook(code: int, data: bytes) -> Any:
    if code == _EXT_NDARRAY:
        return _array_from_payload(data)
    if code == _EXT_NPSCALAR:
        return _array_from_payload(data).reshape(())
    if code == _EXT_TUPLE:
        return tuple(msgpack.unpackb(data, ext_hook=_ext_hook, raw=False, strict_map_key=False))
    if code == _EXT_COMPLEX:
        raise FlaxFormatError("Flax msgpack: ext type 2 (python complex) is not supported: "
                              "a PD teacher checkpoint has only real arrays")
    raise FlaxFormatError(f"Flax msgpack: unknown ext type code {code}")


def _unchunk(tree: Any) -> Any:
    if isinstance(tree, dict):
        if tree.get(_CHUNKED) is True:
            shape = tuple(int(tree["shape"][str(i)]) for i in range(len(tree["shape"])))
            chunks = [tree["chunks"][str(i)] for i in range(len(tree["chunks"]))]
            return np.concatenate([np.ravel(c) for c in chunks]).reshape(shape)
        return {k: _unchunk(v) for k, v in tree.items()}
    return tree


def read_flax_msgpack(path: str | os.PathLike) -> dict:
    """Read a Flax msgpack checkpoint into a nested dict of numpy arrays (and python leaves)."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        tree = msgpack.unpackb(data, ext_hook=_ext_hook, raw=False, strict_map_key=False)
    except FlaxFormatError:
        raise
    except Exception as e:  # msgpack's own decoding errors
        raise FlaxFormatError(f"{path}: not a Flax msgpack checkpoint ({type(e).__name__}: {e})") from e
    tree = _unchunk(tree)
    if not isinstance(tree, dict):
        raise FlaxFormatError(f"{path}: a Flax checkpoint holds a dict at the top level, "
                              f"got {type(tree).__name__}")
    return tree


def _array_payload(a: np.ndarray) -> bytes:
    if a.dtype.kind == "c":
        raise FlaxFormatError(f"Flax msgpack: complex arrays ({a.dtype}) are not supported")
    if a.dtype.kind not in "biuf":
        raise FlaxFormatError(f"Flax msgpack: dtype {a.dtype} is not supported (numeric and bool only)")
    a = np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<"))
    return msgpack.packb((list(a.shape), a.dtype.name, a.tobytes("C")), use_bin_type=True)


def _ext_default(x: Any) -> Any:
    if isinstance(x, np.ndarray):
        return msgpack.ExtType(_EXT_NDARRAY, _array_payload(x))
    if isinstance(x, np.generic):
        return msgpack.ExtType(_EXT_NPSCALAR, _array_payload(np.asarray(x)))
    if isinstance(x, tuple):
        return msgpack.ExtType(_EXT_TUPLE, msgpack.packb(
            list(x), default=_ext_default, strict_types=True, use_bin_type=True))
    if isinstance(x, complex):
        raise FlaxFormatError("Flax msgpack: complex values are not supported")
    raise FlaxFormatError(f"Flax msgpack: cannot serialize {type(x).__name__}")


def _chunk(tree: Any) -> Any:
    if isinstance(tree, Mapping):
        return {k: _chunk(v) for k, v in tree.items()}
    if isinstance(tree, np.ndarray) and tree.nbytes > _MAX_CHUNK_BYTES:
        flat = tree.reshape(-1)
        step = max(1, _MAX_CHUNK_BYTES // tree.dtype.itemsize)
        pieces = [flat[i:i + step] for i in range(0, flat.size, step)]
        return {_CHUNKED: True,
                "shape": {str(i): s for i, s in enumerate(tree.shape)},
                "chunks": {str(i): c for i, c in enumerate(pieces)}}
    return tree


def write_flax_msgpack(path: str | os.PathLike, tree: Mapping) -> None:
    """Write a nested dict of numpy arrays / python scalars in Flax's msgpack format."""
    data = msgpack.packb(_chunk(tree), default=_ext_default, strict_types=True, use_bin_type=True)
    write_atomic(path, lambda f: f.write(data))


# ---------------------------------------------------------------------------------------------
# Locating the teacher parameters
