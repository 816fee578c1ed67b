"""Atomic checkpoint files: write to a temporary file, fsync, then rename over the target."""
import re
from pathlib import Path

import torch

from tract_repro.common.files import write_atomic

PATTERN = re.compile(r"ckpt_(\d{12})\.pt$")


def save_atomic(obj, path):
    """torch.save to ``path`` so that a crash leaves either the old file or the new one, never a torn one."""
    return write_atomic(path, lambda f: torch.save(obj, f), durable=True)


def load(path):
    """Load a checkpoint without unpickling code (weights_only)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def checkpoint_path(directory, samples):
    return Path(directory) / f"ckpt_{samples:012d}.pt"


def list_checkpoints(directory):
    """Checkpoints in ``directory`` sorted by sample count."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := PATTERN.match(p.name))]
    return [p for _, p in sorted(found)]


def prune(directory, keep):
    """Delete all but the newest ``keep`` checkpoints, and stale temporary files."""
    for p in list_checkpoints(directory)[:-keep] if keep > 0 else []:
        p.unlink()
    for p in Path(directory).glob(".ckpt_*.tmp*"):
        p.unlink(missing_ok=True)
