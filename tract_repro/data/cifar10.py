"""CIFAR-10 from torchvision's on-disk "python version" batches, read through the allow-list unpickler."""
import socket
from pathlib import Path

import gin
import numpy as np
import torch

from tract_repro.common.errors import ConfigError
from tract_repro.data import safe_pickle
from tract_repro.data.arrays import ImageArrays
from tract_repro.common.files import file_digest


class DatasetNotFoundError(FileNotFoundError, ValueError):
    """A dataset's files are missing; the message says where to get them."""


def _one_line(text):
    return " ".join(str(text).split())


def _md5(path):
    return file_digest(path, "md5")


def _download(root, CIFAR10):
    """torchvision's downloader with a 10 s socket timeout; returns the failure as one line, or None."""
    from torchvision.datasets import utils as tv_utils

    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(10)
    try:
        tv_utils.download_and_extract_archive(CIFAR10.url, str(root), filename=CIFAR10.filename,
                                              md5=CIFAR10.tgz_md5)
    except Exception as e:  # noqa: BLE001 (any failure becomes the not-found error below)
        return _one_line(f"{type(e).__name__}: {e}")
    finally:
        socket.setdefaulttimeout(old)
    return None


def _get(d, key, path):
    """A batch dict's entry under a bytes key (Python 3 writers) or str key (Python 2 str via latin1)."""
    for k in (key, key.decode()):
        if isinstance(d, dict) and k in d:
            return d[k]
    raise ConfigError(f"{path} is not a CIFAR-10 batch: no {key.decode()!r} entry")


@gin.configurable
def cifar10(root="data", split="train", hflip=None, check_md5=True, download=False):
    """uint8 images (N, 3, 32, 32) from rows of 3072 = R, G, B planes of 32×32; labels 0-9.

    ``hflip`` defaults to True for train (the official training transform flips), False for test.
    """
    from torchvision.datasets import CIFAR10

    if split not in ("train", "test"):
        raise ConfigError(f"CIFAR-10 split must be 'train' or 'test', not {split!r}")
    root = Path(root)
    folder = root / CIFAR10.base_folder
    files = CIFAR10.train_list if split == "train" else CIFAR10.test_list
    missing = [name for name, _ in files if not (folder / name).is_file()]
    failure = None
    if missing and download:
        failure = _download(root, CIFAR10)
        missing = [name for name, _ in files if not (folder / name).is_file()]
    if missing:
        why = f" (download failed: {failure})" if failure else f" (missing {', '.join(missing)})"
        raise DatasetNotFoundError(f"CIFAR-10 not found in {folder}{why}: download {CIFAR10.url} "
                                   f"and extract it into {root}")

    images, labels = [], []
    for name, md5 in files:
        path = folder / name
        if check_md5 and (got := _md5(path)) != md5:
            raise ConfigError(f"{path} has md5 {got}, torchvision expects {md5}: the file is corrupt or "
                             f"not CIFAR-10; delete {folder} and re-download {CIFAR10.url}")
        batch = safe_pickle.load(path)
        data = np.asarray(_get(batch, b"data", path))
        lab = np.asarray(_get(batch, b"labels", path), dtype=np.int64)
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 or len(lab) != len(data):
            raise ConfigError(f"{path}: expected uint8 data (N, 3072) and N labels, got {data.dtype} "
                             f"{data.shape} and {len(lab)} labels")
        images.append(data.reshape(-1, 3, 32, 32))
        labels.append(lab)
    labels = np.concatenate(labels)
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise ConfigError(f"CIFAR-10 labels in {folder} must be 0-9, got {labels.min()}..{labels.max()}")
    return ImageArrays(torch.from_numpy(np.concatenate(images)), torch.from_numpy(labels),
                       num_classes=10, name=f"cifar10-{split}",
                       hflip=(split == "train") if hflip is None else bool(hflip))
