"""scikit-learn's 8×8 digits: the embedded default dataset (1797 images, 10 classes)."""
import gin
import torch

from tract_repro.data.arrays import ImageArrays


@gin.configurable
def digits():
    """Images scaled from [0, 16] to [−1, 1], shape (1797, 1, 8, 8), with labels 0-9."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = torch.from_numpy(d.images).float().unsqueeze(1) / 8.0 - 1.0
    return ImageArrays(images, torch.from_numpy(d.target).long(), num_classes=10, name="digits")
