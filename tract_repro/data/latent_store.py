"""The on-disk layout of an encoded latent data set: a manifest and fixed-size shards of ``.npy`` arrays.

``OUT/latents.json`` (the manifest, written before any shard and never changed) says what was encoded
and how.  Shard k holds samples [k·S, min(N, (k + 1)·S)) of N, with S the shard size:

* ``latents_<k>.npy``: (n, C, h, w) latents, float32 or float16 (the manifest's ``latent_dtype``);
* ``labels_<k>.npy``: (n,) int64 class labels (0 where the source has none);
* ``text_<k>.npy``: (n, L, D) float16 caption embeddings (text-conditioned models only);

and ``null_text.npy`` (L, D) float16 is the empty prompt's embedding ∅.  Each file is written
atomically and a shard's latents file last, so shard k is complete iff ``latents_<k>.npy`` exists.
"""
import json
from pathlib import Path

import numpy as np

from tract_repro.common.errors import ConfigError
from tract_repro.common.files import write_atomic, write_json

MANIFEST = "latents.json"
FORMAT = "tract-latents-1"
NULL_TEXT = "null_text.npy"
KINDS = ("text", "labels", "latents")  # the files of a shard, in the order they are written (latents last)


def shard_file(kind, k):
    """The name of shard k's ``kind`` file (``latents``, ``labels`` or ``text``)."""
    return f"{kind}_{k:05d}.npy"


def num_shards(count, shard_size):
    """⌈N / S⌉."""
    return -(-count // shard_size)


def shard_rows(manifest, k):
    """(first, stop) sample indices of shard k."""
    first = k * manifest["shard_size"]
    return first, min(manifest["count"], first + manifest["shard_size"])


def complete_shards(folder, manifest):
    """How many leading shards are complete (their latents file exists): a resume starts after them."""
    n, total = 0, num_shards(manifest["count"], manifest["shard_size"])
    while n < total and (Path(folder) / shard_file("latents", n)).is_file():
        n += 1
    return n


def read_manifest(folder):
    """The manifest of ``folder`` as a dict, or None if it has none; a torn or foreign one is a ConfigError."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path} is not a latents manifest ({exc}); remove {folder} and encode again") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ConfigError(f"{path} is not a {FORMAT} manifest; remove {folder} and encode again")
    return manifest


def first_difference(old, new):
    """The first field (dotted) where two manifests differ, with both values, or None if they are equal."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in list(old) + [k for k in new if k not in old]:
            if key not in old or key not in new:
                return key, old.get(key, "absent"), new.get(key, "absent")
            found = first_difference(old[key], new[key])
            if found:
                return (f"{key}.{found[0]}" if found[0] else key), found[1], found[2]
        return None
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        for i, (a, b) in enumerate(zip(old, new)):
            found = first_difference(a, b)
            if found:
                return (f"{i}.{found[0]}" if found[0] else str(i)), found[1], found[2]
        return None
    return None if old == new else ("", old, new)


def _short(value, width=60):
    text = json.dumps(value)
    return text if len(text) <= width else text[:width - 1] + "…"


def check_out_dir(out, manifest):
    """How many shards of ``manifest`` ``out`` already holds; refuses (one line) a folder holding anything else.

    ``out`` may be missing, empty, or hold an encoding with exactly this manifest (a resume).
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file: choose a folder")
    if not out.exists() or not any(out.iterdir()):
        return 0
    old = read_manifest(out)
    if old is None:
        raise ConfigError(f"{out} holds files but no {MANIFEST}: choose an empty or new --out folder")
    new = json.loads(json.dumps(manifest))  # as it will read back
    diff = first_difference(old, new)
    if diff:
        field, was, now = diff
        raise ConfigError(f"{out} holds a different encoding ({field or 'manifest'}: {_short(was)} there, "
                          f"{_short(now)} now): choose another --out or remove {out}")
    return complete_shards(out, manifest)


def remove_partial_files(out):
    """Remove the temporary files a killed writer left (``.<name>.tmp<pid>``, made by ``write_atomic``)."""
    for path in Path(out).glob(".*.tmp[0-9]*"):
        if path.is_file():
            path.unlink()


def save_array(path, array):
    """``np.save`` written atomically (the same array gives the same bytes)."""
    write_atomic(path, lambda f: np.save(f, np.ascontiguousarray(array), allow_pickle=False))


def write_manifest(out, manifest):
    write_json(Path(out) / MANIFEST, manifest)
