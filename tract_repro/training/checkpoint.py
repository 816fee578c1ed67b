"""Checkpoint files: written atomically with a sha256 beside them, loaded only after the sha256 matches.

``ckpt_<samples>.pt`` (and ``ema.pt``) is written to a temporary file, fsynced and renamed into
place; its digest then goes to ``<name>.sha256`` in ``sha256sum`` format (``sha256sum -c`` checks
it by hand).  :func:`load` refuses a file whose digest differs, that cannot be read, or that is not
a plain checkpoint (``weights_only``: no code runs), with one line naming the file.  A file written
before its checksum (a crash between the two renames, or an older run) loads unverified.
"""
import pickle
import re
from pathlib import Path

import torch

from tract_repro.common.errors import ConfigError, one_line
from tract_repro.common.files import sha256, write_atomic

PATTERN = re.compile(r"ckpt_(\d{12})\.pt$")
CHECKSUM = ".sha256"
ASIDE = ".corrupt"


class UnreadableCheckpoint(ConfigError):
    """A checkpoint or weights file that fails its checksum, cannot be read, or is not a plain checkpoint."""


def checksum_path(path):
    path = Path(path)
    return path.with_name(path.name + CHECKSUM)


def save_atomic(obj, path):
    """torch.save to ``path`` so that a crash leaves either the old file or the new one, never a torn one;
    then its sha256 beside it."""
    path = write_atomic(path, lambda f: torch.save(obj, f), durable=True)
    write_atomic(checksum_path(path), lambda f: f.write(f"{sha256(path)}  {path.name}\n"), mode="w", durable=True)
    return path


def verify(path):
    """Raise :class:`UnreadableCheckpoint` if ``path`` has a checksum beside it that its bytes do not match."""
    path, record = Path(path), checksum_path(path)
    if not record.is_file():
        return
    expected = record.read_text().split()[:1]
    if not path.is_file():
        raise UnreadableCheckpoint(f"{path} is missing (its checksum {record.name} is there)")
    if [sha256(path)] != expected:
        raise UnreadableCheckpoint(f"{path} does not match its sha256 ({record.name}): the file is corrupt")


def load(path):
    """A checkpoint's contents, after its checksum matched, without unpickling code (weights_only)."""
    path = Path(path)
    verify(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "GLOBAL" in str(exc):  # weights_only met an object of a module it does not allow: code would run
            raise UnreadableCheckpoint(f"{path} is not a plain checkpoint (loading it would run code): refused, "
                                       f"not loaded") from None
        raise UnreadableCheckpoint(f"{path} cannot be read as a checkpoint (not a torch.save file)") from None
    except FileNotFoundError:
        raise UnreadableCheckpoint(f"{path} not found") from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, AttributeError, IndexError) as exc:
        raise UnreadableCheckpoint(f"{path} cannot be read as a checkpoint ({type(exc).__name__}: "
                                   f"{one_line(exc)[:200]})") from None


def set_aside(path):
    """Rename an unusable checkpoint (and its checksum) to ``<name>.corrupt``, never deleting it; returns the new name."""
    path = Path(path)
    aside, n = path.with_name(path.name + ASIDE), 1
    while aside.exists():
        aside, n = path.with_name(f"{path.name}{ASIDE}{n}"), n + 1
    path.rename(aside)
    if checksum_path(path).is_file():
        checksum_path(path).rename(checksum_path(aside))
    return aside


def checkpoint_path(directory, samples):
    return Path(directory) / f"ckpt_{samples:012d}.pt"


def list_checkpoints(directory):
    """Checkpoints in ``directory`` sorted by sample count."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := PATTERN.match(p.name))]
    return [p for _, p in sorted(found)]


def newest_usable(directory, warn=print):
    """(path, contents) of the newest checkpoint in ``directory`` that loads, or (None, None) if there is none.

    An unusable newer one is set aside (renamed, not deleted) and ``warn`` gets one line naming it and
    the one used instead.  If checkpoints exist and none is usable, one line says so and names them.
    """
    found, aside = list_checkpoints(directory), []
    for path in reversed(found):
        try:
            state = load(path)
        except UnreadableCheckpoint as exc:
            aside.append((path, set_aside(path), exc))
            continue
        for bad, moved, exc in aside:
            warn(f"warning: {one_line(exc)}; set aside as {moved.name}; resuming from {path}")
        return path, state
    if aside:
        names = ", ".join(moved.name for _, moved, _ in aside)
        raise UnreadableCheckpoint(f"no usable checkpoint in {directory} ({one_line(aside[0][2])}); set aside as {names}: "
                                   f"delete {Path(directory).parent} to train from the start")
    return None, None


def prune(directory, keep):
    """Delete all but the newest ``keep`` checkpoints (with their checksums), and stale temporary files."""
    for p in list_checkpoints(directory)[:-keep] if keep > 0 else []:
        p.unlink()
        checksum_path(p).unlink(missing_ok=True)
    for p in Path(directory).glob(".ckpt_*.tmp*"):
        p.unlink(missing_ok=True)
