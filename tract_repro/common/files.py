"""Files and folders written atomically, and file digests (no torch import, so quick checks stay quick).

Every file the project writes for a user (checkpoints, ema.pt, run.json, metrics, reference
statistics, ImageNet batches, tables) goes through :func:`write_atomic`: a crash leaves the old file
or the new one, never a torn one.  A folder written as a whole (an export, an imported teacher) is
filled by :func:`atomic_folder` and appears complete or not at all.
"""
import contextlib
import hashlib
import json
import os
from pathlib import Path


def write_atomic(path, write, mode="wb", durable=False):
    """Call ``write(f)`` on a temporary file beside ``path``, then rename it over ``path``.

    ``durable``: fsync the file and its directory too (checkpoints), so the rename survives a power cut.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, mode) as f:
            write(f)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    return path


@contextlib.contextmanager
def atomic_folder(path):
    """Yield a new hidden folder beside ``path`` to fill; it is renamed to ``path`` when the block ends.

    An empty folder at ``path`` is replaced; any other file or folder there is left as it is and
    FileExistsError raised.  On any failure the hidden folder is removed, and nothing else.
    """
    import shutil

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)  # ours: a partial folder of a process with this pid that died
    tmp.mkdir()
    try:
        yield tmp
        try:
            os.replace(tmp, path)
        except OSError:
            raise FileExistsError(f"{path} holds files") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_text(path, text):
    """Write ``text`` to ``path`` atomically."""
    return write_atomic(path, lambda f: f.write(text), mode="w")


def write_json(path, obj, **dumps):
    """Write ``obj`` as indented JSON (and a final newline) atomically; ``dumps``: more json.dumps options."""
    return write_text(path, json.dumps(obj, indent=2, **dumps) + "\n")


def file_digest(path, algorithm="sha256", chunk=1 << 20):
    """Hex digest of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def sha256(path):
    """sha256 of a file's bytes: provenance (teachers, weights) and cache keys (references)."""
    return file_digest(path, "sha256")
