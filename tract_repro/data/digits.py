"""scikit-learn's 8×8 digits: the embedded default dataset (1797 images, 10 classes)."""
import importlib.util
from pathlib import Path

import gin
import numpy as np
import torch

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
