"""Import Google's Progressive-Distillation (PD) teacher checkpoints (Flax, msgpack) into our UNet.

The teachers of Salimans & Ho (2022) are released as Flax checkpoints
(``gs://gresearch/diffusion-distillation/{cifar_original,imagenet_original}``).
They are read here without TensorFlow / JAX / Flax: :func:`read_flax_msgpack` decodes
the msgpack container itself, and :func:`load_google_pd` turns the teacher parameters
into a PyTorch state dict for :class:`tract_repro.networks.unet.UNet`.

The file format is read by :mod:`tract_repro.networks.flax_msgpack` (nothing is unpickled).

Flax → PyTorch mapping
----------------------
The Flax module names below follow the official ml-tract converter
(``teacher/download_and_convert_jax.py``, see ``ml-tract-notes.md`` §6) and the Flax
``diffusion_distillation/unet.py`` that it reads. Module names contain a dot and are a
*single* key of the parameter dict (``params['down_0.block_1']['conv1']['kernel']``). They
have not been checked against a real checkpoint here (no download possible): do so when
one is available (``read_flax_msgpack`` + :func:`google_pd_mapping` print every path).

================================  ===========================================
our module                        Flax module
================================  ===========================================
``time.0`` / ``time.2``           ``dense0`` / ``dense1``
``class_emb``                     ``class_emb`` (class-conditional nets only)
``conv_in``                       ``conv_in``
``down.{k}`` (level i, block j)   ``down_{i}.block_{j}`` (+ ``down_{i}.attn_{j}``)
``down.{k}`` (resample='down')    ``down_{i}.downsample`` (after level i's blocks)
``mid.0.res`` / ``mid.0.attn``    ``mid.block_1`` / ``mid.attn_1``
``mid.1.res``                     ``mid.block_2``
``up.{k}`` (level i, block j)     ``up_{i}.block_{j}`` (+ ``up_{i}.attn_{j}``), i descending,
                                  j in 0..num_res_blocks
``up.{k}`` (resample='up')        ``up_{i}.upsample`` (after level i's blocks, i > 0)
``out_norm`` / ``out_conv``       ``norm_out`` / ``conv_out``
ResBlock ``norm1, conv1, time,    ``norm1, conv1, temb_proj, norm2, conv2,
norm2, conv2, skip``              nin_shortcut``
SelfAttention ``norm``            ``norm``
SelfAttention ``qkv``             ``q``, ``k``, ``v`` (DenseGeneral)
SelfAttention ``proj``            ``proj_out`` (DenseGeneral over (heads, head_dim))
================================  ===========================================

The level / block indices of our ``down`` / ``up`` entries are derived from the UNet's own
structure (resampling blocks separate the levels), mirroring how the official converter
walks the Flax names.

Tensor transforms (Flax → PyTorch):

* Conv kernel ``[kH, kW, in, out]`` → ``[out, in, kH, kW]``.
* Dense kernel ``[in, out]`` → ``[out, in]``; ``nin_shortcut`` (a Dense) → ``[out, in, 1, 1]``.
* GroupNorm ``scale`` / ``bias`` → ``weight`` / ``bias``; every other bias is copied.
* ``q``, ``k``, ``v`` kernels ``(C, heads, hd)`` are concatenated on the last axis to
  ``(C, heads, 3 hd)`` and rearranged to ``(heads * 3 hd, C, 1, 1)``; the biases
  ``(heads, hd)`` x 3 to ``(heads, 3 hd)`` flattened. This is the per-head ``[q, k, v]``
  channel layout of our ``SelfAttention.qkv``.
* ``proj_out`` kernel ``(heads, hd, C)`` → ``(C, heads * hd, 1, 1)``.

Google's own loader reshapes every teacher tensor to the shape of a freshly initialised
model "to fix flax version incompatibilities"; the only plausible such difference is a
flattened DenseGeneral (``(C, heads * hd)``, ``(heads * hd,)``, ``(heads * hd, C)``), so
exactly those flattened attention shapes are also accepted (C-order reshape). Any other
shape difference is an error.

Numerics note: Flax's GroupNorm uses eps = 1e-6, ours 1e-5 (as in ml-tract), so the imported
teacher is close to, not bit-identical with, the JAX model.
"""
from __future__ import annotations

import os
from collections import Counter, deque
from dataclasses import dataclass
from typing import Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from tract_repro.common.errors import ConfigError
from tract_repro.networks.flax_msgpack import FlaxFormatError, read_flax_msgpack, write_flax_msgpack

__all__ = [
    "FlaxFormatError", "ParamMapping", "read_flax_msgpack", "write_flax_msgpack", "find_teacher_params",
    "flatten_tree", "flax_module_map", "google_pd_mapping", "iter_mapping_rows", "load_google_pd",
    "import_teacher",
]

FlaxPath = tuple  # tuple[str, ...]

_HINT = "the checkpoint is not a CIFAR-10/ImageNet64 PD teacher for this UNet config"


# ---------------------------------------------------------------------------------------------

_PREFERRED_KEYS = ("ema_params", "params", "target")


def find_teacher_params(tree: Mapping) -> Mapping:
    """The first mapping (breadth first, preferring ``ema_params``, then ``params``, then
    ``target`` at every level) that contains a ``conv_in`` module."""
    queue: deque = deque([tree])
    while queue:
        node = queue.popleft()
        if "conv_in" in node and isinstance(node["conv_in"], Mapping):
            return node
        keys = [k for k in _PREFERRED_KEYS if k in node] + [k for k in node if k not in _PREFERRED_KEYS]
        queue.extend(node[k] for k in keys if isinstance(node[k], Mapping))
    raise ConfigError(f"no Flax parameter dict with a 'conv_in' module found (top-level keys: "
                     f"{sorted(map(str, tree))[:8]}): {_HINT}")


def flatten_tree(tree: Mapping, prefix: FlaxPath = ()) -> dict:
    """{path tuple: leaf} for every non-mapping leaf (empty mappings have no leaves)."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(flatten_tree(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = v
    return out


def _fmt(path: FlaxPath) -> str:
    return "/".join(map(str, path))


# ---------------------------------------------------------------------------------------------
# The mapping
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ParamMapping:
    """One PyTorch parameter and the Flax leaves it is built from.

    ``transform`` is one of ``copy`` (biases, GroupNorm scale), ``conv``, ``dense``, ``nin``,
    ``qkv_kernel``, ``qkv_bias``, ``proj_kernel``; ``heads`` is set for the attention ones.
    """
    name: str
    shape: tuple
    flax_paths: tuple  # tuple[FlaxPath, ...]
    flax_shapes: tuple  # tuple[tuple[int, ...], ...], the canonical Flax shapes
    transform: str
    heads: int | None = None


# Our sub-module name, Flax sub-module name, layer kind, inside a ResBlock.
_RESBLOCK_LAYERS = (
    ("norm1", "norm1", "norm"),
    ("conv1", "conv1", "conv"),
    ("time", "temb_proj", "dense"),
    ("norm2", "norm2", "norm"),
    ("conv2", "conv2", "conv"),
    ("skip", "nin_shortcut", "nin"),
)


def _level_walk(blocks: Sequence[nn.Module], resample: str, flax_prefix: str,
                levels: Sequence[int], per_level: int, our_prefix: str) -> list:
    """(our prefix, Flax prefix, kind) for a down/up list. Level ``levels[n]`` owns the n-th run
    of ``per_level`` non-resampling blocks; a ``resample`` block closes every level but the last."""
    out = []
    n, j = 0, 0
    for k, blk in enumerate(blocks):
        res = getattr(blk, "res", None)
        if res is None:
            raise ConfigError(f"{our_prefix}.{k} is not a Block: cannot map it onto a PD teacher")
        if n >= len(levels):
            raise ConfigError(f"{our_prefix}.{k}: more blocks than the UNet's levels allow")
        i = levels[n]
        if res.resample == resample:
            if j != per_level or n == len(levels) - 1:
                raise ConfigError(f"{our_prefix}.{k}: unexpected '{resample}' block (level {i} has "
                                 f"{j} blocks, expected {per_level})")
            if blk.attn is not None:
                raise ConfigError(f"{our_prefix}.{k}: resampling block with attention has no PD counterpart")
            name = "downsample" if resample == "down" else "upsample"
            out.append((f"{our_prefix}.{k}.res", f"{flax_prefix}_{i}.{name}", "resblock"))
            n, j = n + 1, 0
        elif res.resample is None:
            out.append((f"{our_prefix}.{k}.res", f"{flax_prefix}_{i}.block_{j}", "resblock"))
            if blk.attn is not None:
                out.append((f"{our_prefix}.{k}.attn", f"{flax_prefix}_{i}.attn_{j}", "attention"))
            j += 1
        else:
            raise ConfigError(f"{our_prefix}.{k}: resample={res.resample!r} in the {our_prefix} path")
    if n != len(levels) - 1 or j != per_level:
        raise ConfigError(f"{our_prefix}: {n + 1} levels with {j} blocks in the last one; expected "
                         f"{len(levels)} levels of {per_level} blocks")
    return out


def flax_module_map(unet: nn.Module) -> list:
    """[(our module prefix, Flax module name, kind)], kind in conv/dense/norm/resblock/attention.

    The numbers of levels and of residual blocks per level are read off the UNet's
    ``down`` list (the ``resample='down'`` blocks separate the levels)."""
    n_down = sum(1 for b in unet.down if b.res.resample == "down")
    n_levels = n_down + 1
    n_plain = sum(1 for b in unet.down if b.res.resample is None)
    if n_plain % n_levels:
        raise ConfigError(f"down path: {n_plain} residual blocks do not split into {n_levels} levels")
    n_res = n_plain // n_levels

    out = [("time.0", "dense0", "dense"), ("time.2", "dense1", "dense")]
    if getattr(unet, "class_emb", None) is not None:
        out.append(("class_emb", "class_emb", "dense"))
    out.append(("conv_in", "conv_in", "conv"))
    out += _level_walk(unet.down, "down", "down", list(range(n_levels)), n_res, "down")
    if len(unet.mid) != 2 or unet.mid[0].attn is None or unet.mid[1].attn is not None:
        raise ConfigError("mid: expected [ResBlock + attention, ResBlock] as in the PD UNet")
    out += [("mid.0.res", "mid.block_1", "resblock"), ("mid.0.attn", "mid.attn_1", "attention"),
            ("mid.1.res", "mid.block_2", "resblock")]
    out += _level_walk(unet.up, "up", "up", list(reversed(range(n_levels))), n_res + 1, "up")
    out += [("out_norm", "norm_out", "norm"), ("out_conv", "conv_out", "conv")]
    return out


def _flax_shapes(transform: str, shape: tuple, heads: int | None) -> tuple:
    """Canonical Flax shapes of the leaves a PyTorch parameter of ``shape`` is built from."""
    if transform == "copy":
        return (tuple(shape),)
    if transform == "conv":
        o, i, kh, kw = shape
        return ((kh, kw, i, o),)
    if transform == "dense":
        o, i = shape
        return ((i, o),)
    if transform == "nin":
        o, i, _, _ = shape
        return ((i, o),)
    if transform == "qkv_kernel":
        c = shape[1]
        return ((c, heads, c // heads),) * 3
    if transform == "qkv_bias":
        c = shape[0] // 3
        return ((heads, c // heads),) * 3
    if transform == "proj_kernel":
        c = shape[0]
        return ((heads, shape[1] // heads, c),)
    raise ConfigError(f"unknown transform {transform!r}")


def _accepted_shapes(transform: str, canonical: tuple) -> tuple:
    """The canonical shape, plus the flattened DenseGeneral shape for attention leaves."""
    if transform == "qkv_kernel":
        c, h, d = canonical
        return canonical, (c, h * d)
    if transform == "qkv_bias":
        h, d = canonical
        return canonical, (h * d,)
    if transform == "proj_kernel":
        h, d, c = canonical
        return canonical, (h * d, c)
    return (canonical,)


def _to_torch_layout(transform: str, arrays: Sequence[np.ndarray], canonical: tuple) -> np.ndarray:
    """Apply the Flax → PyTorch transform (arrays already shape-checked)."""
    arrays = [np.reshape(a, s) for a, s in zip(arrays, canonical)]
    if transform == "copy":
        return arrays[0]
    if transform == "conv":
        return arrays[0].transpose(3, 2, 0, 1)
    if transform == "dense":
        return arrays[0].T
    if transform == "nin":
        return arrays[0].T[:, :, None, None]
    if transform == "qkv_kernel":
        w = np.concatenate(arrays, axis=2)  # (C, heads, 3 hd): per head [q, k, v]
        c = w.shape[0]
        return w.reshape(c, -1).T[:, :, None, None]
    if transform == "qkv_bias":
        return np.concatenate(arrays, axis=1).reshape(-1)
    if transform == "proj_kernel":
        h, d, c = arrays[0].shape
        return arrays[0].reshape(h * d, c).T[:, :, None, None]
    raise ConfigError(f"unknown transform {transform!r}")


def google_pd_mapping(unet: nn.Module) -> list:
    """Every PyTorch parameter of ``unet`` with its Flax source leaves, as :class:`ParamMapping`.

    Raises if a parameter of ``unet`` has no Flax counterpart (e.g. extra conditions) or is
    mapped twice. Works on a meta-device UNet (only shapes are read)."""
    state = unet.state_dict()
    out = []

    def add(name: str, flax_paths: tuple, transform: str, heads: int | None = None):
        if name not in state:
            raise ConfigError(f"internal mapping error: {name} is not a parameter of this UNet")
        shape = tuple(state[name].shape)
        out.append(ParamMapping(name, shape, flax_paths, _flax_shapes(transform, shape, heads),
                                transform, heads))

    def layer(ours: str, theirs: tuple, kind: str):
        """A conv / dense / nin / norm layer; ``theirs`` is the Flax module path (a tuple)."""
        if kind == "norm":
            add(f"{ours}.weight", (theirs + ("scale",),), "copy")
        else:
            add(f"{ours}.weight", (theirs + ("kernel",),), kind)
        add(f"{ours}.bias", (theirs + ("bias",),), "copy")

    modules = dict(unet.named_modules())
    for ours, theirs, kind in flax_module_map(unet):
        if kind in ("conv", "dense", "norm"):
            layer(ours, (theirs,), kind)
        elif kind == "resblock":
            for our_sub, their_sub, sub_kind in _RESBLOCK_LAYERS:
                if modules.get(f"{ours}.{our_sub}") is not None:
                    layer(f"{ours}.{our_sub}", (theirs, their_sub), sub_kind)
        elif kind == "attention":
            heads = modules[ours].heads
            layer(f"{ours}.norm", (theirs, "norm"), "norm")
            add(f"{ours}.qkv.weight", tuple((theirs, x, "kernel") for x in "qkv"), "qkv_kernel", heads)
            add(f"{ours}.qkv.bias", tuple((theirs, x, "bias") for x in "qkv"), "qkv_bias", heads)
            add(f"{ours}.proj.weight", ((theirs, "proj_out", "kernel"),), "proj_kernel", heads)
            add(f"{ours}.proj.bias", ((theirs, "proj_out", "bias"),), "copy")
        else:
            raise ConfigError(f"unknown module kind {kind!r}")

    counts = Counter(m.name for m in out)
    dup = sorted(n for n, c in counts.items() if c > 1)
    if dup:
        raise ConfigError(f"internal mapping error: {len(dup)} parameters mapped twice: {dup[:5]}")
    unmapped = [n for n in state if n not in counts]
    if unmapped:
        raise ConfigError(f"{len(unmapped)} UNet parameters have no PD-teacher counterpart (first: "
                         f"{', '.join(unmapped[:5])}): the PD teachers have no extra conditions")
    return out


# ---------------------------------------------------------------------------------------------
# Import
# ---------------------------------------------------------------------------------------------

def load_google_pd(path: str | os.PathLike | Mapping, unet: nn.Module) -> dict:
    """PyTorch state dict for ``unet`` built from a PD teacher checkpoint (a file path, or an
    already-read tree as returned by :func:`read_flax_msgpack`).

    Every Flax leaf the mapping needs must exist with the expected shape, and every leaf of the
    teacher parameter dict must be used; otherwise a one-line ``ValueError`` is raised."""
    tree = path if isinstance(path, Mapping) else read_flax_msgpack(path)
    leaves = flatten_tree(find_teacher_params(tree))
    mapping = google_pd_mapping(unet)

    needed = [p for m in mapping for p in m.flax_paths]
    missing = [p for p in needed if p not in leaves]
    if missing:
        raise ConfigError(f"{len(missing)} Flax entries missing from the checkpoint (first: "
                         f"{', '.join(map(_fmt, missing[:5]))}): {_HINT}")
    used = set(needed)
    extra = [p for p in leaves if p not in used]
    if extra:
        raise ConfigError(f"{len(extra)} Flax entries of the checkpoint are not used by this UNet (first: "
                         f"{', '.join(map(_fmt, extra[:5]))}): {_HINT}")

    state = unet.state_dict()
    out = {}
    for m in mapping:
        arrays = []
        for p, canonical in zip(m.flax_paths, m.flax_shapes):
            a = leaves[p]
            if not isinstance(a, np.ndarray):
                raise ConfigError(f"Flax entry {_fmt(p)} (for {m.name}) is a {type(a).__name__}, not an "
                                 f"array: {_HINT}")
            if tuple(a.shape) not in _accepted_shapes(m.transform, canonical):
                raise ConfigError(f"shape mismatch for {m.name}: Flax {_fmt(p)} has shape {tuple(a.shape)}, "
                                 f"this UNet needs {canonical} (PyTorch {m.shape}): {_HINT}")
            if a.dtype.kind not in "f":
                raise ConfigError(f"Flax entry {_fmt(p)} (for {m.name}) has dtype {a.dtype}, not floating: "
                                 f"{_HINT}")
            arrays.append(a)
        value = _to_torch_layout(m.transform, arrays, m.flax_shapes)
        assert tuple(value.shape) == m.shape, (m.name, value.shape, m.shape)
        ref = state[m.name]
        out[m.name] = torch.tensor(np.ascontiguousarray(value), dtype=ref.dtype)
    return out


def import_teacher(path: str | os.PathLike | Mapping, unet: nn.Module) -> nn.Module:
    """Load a PD teacher checkpoint into ``unet`` (strictly) and return it."""
    unet.load_state_dict(load_google_pd(path, unet), strict=True)
    return unet


def iter_mapping_rows(unet: nn.Module) -> Iterator[tuple]:
    """(our name, Flax path string, canonical Flax shape) for every Flax leaf, for inspection."""
    for m in google_pd_mapping(unet):
        for p, s in zip(m.flax_paths, m.flax_shapes):
            yield m.name, _fmt(p), s
