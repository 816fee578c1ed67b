"""scikit-learn's 8×8 digits: the embedded default dataset (1797 images, 10 classes), and the same digits
upsampled to R×R by nearest neighbour (the latent digits' images, source ``digits:R`` of ``encode_latents``)."""
import importlib.util
from pathlib import Path

import gin
import numpy as np
import torch

from tract_repro.common.errors import ConfigError
from tract_repro.data.arrays import ImageArrays


def digits_arrays():
    """(images (1797, 8, 8) in [0, 16], labels): scikit-learn's ``digits.csv.gz``, the file ``load_digits`` parses.

    Read here directly, because importing sklearn costs ~1.5 s of CPU in every process that trains or
    evaluates (tests check the arrays equal ``load_digits()``'s); ``load_digits`` if the file has moved.
    """
    spec = importlib.util.find_spec("sklearn")  # finds the package without running its __init__
    path = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz" if spec and spec.origin else None
    if path is None or not path.is_file():
        from sklearn.datasets import load_digits

        d = load_digits()
        return d.images, d.target
    raw = np.loadtxt(path, delimiter=",")
    return raw[:, :-1].reshape(-1, 8, 8), raw[:, -1].astype(np.int64)


@gin.configurable
def digits():
    """Images scaled from [0, 16] to [−1, 1], shape (1797, 1, 8, 8), with labels 0-9."""
    images, labels = digits_arrays()
    images = torch.from_numpy(images).float().unsqueeze(1) / 8.0 - 1.0
    return ImageArrays(images, torch.from_numpy(labels).long(), num_classes=10, name="digits")


#: the prefix of the upsampled digits as an image source of ``encode_latents`` (``digits:32``)
SOURCE_PREFIX = "digits:"


def upsample(images, resolution):
    """Images (N, C, 8, 8) → (N, C, R, R) by nearest-neighbour upsampling: each digit pixel becomes an (R/8)² block.

    Nearest, so that averaging each block (the area average evaluation applies before the 8×8 digits classifier)
    gives back the 8×8 digit exactly; R must be a multiple of 8.
    """
    side = images.shape[-1]
    if resolution < side or resolution % side:
        raise ConfigError(f"the digits are {side}×{side}: upsample them to a multiple of {side} (16, 32, …), "
                          f"not {resolution}")
    factor = resolution // side
    return images.repeat_interleave(factor, dim=-2).repeat_interleave(factor, dim=-1)


@gin.configurable
def digits_upsampled(resolution=32):
    """scikit-learn's digits at R×R: :func:`digits` (1 channel, [−1, 1], labels 0-9) upsampled by nearest neighbour,
    shape (1797, 1, R, R).  The pixel data set of the latent digits' VAE and the images ``digits:R`` encodes."""
    small = digits()
    return ImageArrays(upsample(small.images, int(resolution)), small.labels, num_classes=10,
                       name=f"digits-{int(resolution)}")


def source_resolution(spec):
    """R of a source named ``digits:R``, or None for any other source name."""
    spec = str(spec)
    if not spec.startswith(SOURCE_PREFIX):
        return None
    value = spec[len(SOURCE_PREFIX):]
    if not value.isdigit() or int(value) < 8 or int(value) % 8:
        raise ConfigError(f"source {spec}: write digits:R with R a multiple of 8 (digits:32 is the latent digits' "
                          f"32×32)")
    return int(value)
