"""Training lengths counted in samples: ``96M`` = 96·2²⁰, ``200K`` = 200·2¹⁰ (as in the official code)."""
import re

from tract_repro.common.errors import ConfigError

SUFFIXES = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}


def parse_samples(value):
    """An int, or a string like '96M', '1.5M', '200K', '4096' → a number of samples (int)."""
    if isinstance(value, bool):
        raise ConfigError(f"invalid sample count {value!r}: use an int or a string like '96M'")
    if isinstance(value, int):
        if value < 0:
            raise ConfigError(f"invalid sample count {value!r}: it must be non-negative")
        return value
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?)\s*", str(value))
    if not match:
        raise ConfigError(f"invalid sample count {value!r}: use an int or a number with K, M or G (2^10, 2^20, 2^30), e.g. '96M'")
    number, suffix = match.groups()
    samples = float(number) * SUFFIXES[suffix]
    if samples != int(samples):
        raise ConfigError(f"sample count {value!r} is not a whole number of samples")
    return int(samples)


def format_samples(samples):
    """The inverse of :func:`parse_samples` for display: '96M', '1.5M', '200K' or '4096' (the largest unit it fits)."""
    for suffix in ("G", "M", "K"):
        value = samples / SUFFIXES[suffix]
        if value >= 1 and value == round(value, 2):
            return f"{value:g}{suffix}"
    return str(int(samples))
