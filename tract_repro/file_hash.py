"""File digests for provenance, cache keys and download checks (no torch import, so quick checks stay quick)."""
import hashlib


def file_digest(path, algorithm="sha256", chunk=1 << 20):
    """Hex digest of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def sha256(path):
    return file_digest(path, "sha256")
