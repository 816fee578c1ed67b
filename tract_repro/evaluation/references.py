"""Reference statistics of a training set for FID (method-spec §8): μ and Σ of its Inception features as an ``.npz``
(``mu``, ``sigma`` and what they were computed from), written atomically; every result records the file's sha256.

CIFAR-10's come from clean-fid's precomputed statistics of the protocol's network and input path (never
downloaded), ImageNet 64's are computed from our training-set loader, and published ones (EDM's ``fid-refs``)
are imported from their ``.npz``.
"""
from pathlib import Path

import numpy as np

from tract_repro.common.errors import ConfigError
from tract_repro.common.files import sha256, write_atomic
from tract_repro.evaluation import frechet, protocols, sources


class MissingStatistics(ConfigError):
    """Reference statistics are not on disk."""


def save_reference(path, mu, sigma, **meta):
    """Reference statistics as an .npz (mu, sigma, and strings/ints saying what they come from), written atomically."""
    return write_atomic(path, lambda f: np.savez(f, mu=np.asarray(mu, np.float64), sigma=np.asarray(sigma, np.float64),
                                                 **{k: np.asarray(v) for k, v in meta.items()}))


def load_reference(path):
    """(μ, Σ), metadata (with the file's sha256) of reference statistics written by :func:`save_reference`."""
    path = Path(path)
    if not path.is_file():
        raise MissingStatistics(f"reference statistics {path} not found: compute them with "
                                f"`python -m tract_repro.evaluation.fid reference ...` (dvc repro runs that stage)")
    with np.load(path, allow_pickle=False) as z:
        mu, sigma = z["mu"], z["sigma"]
        meta = {k: z[k].item() if z[k].ndim == 0 else z[k].tolist() for k in z.files if k not in ("mu", "sigma")}
    meta.update(path=str(path), sha256=sha256(path))
    return (mu, sigma), meta


def cifar10_reference(out, protocol="tract"):
    """Copy clean-fid's precomputed CIFAR-10 training-set statistics of the protocol's network and input path
    (never downloaded) to ``out``."""
    spec = protocols.get(protocol)
    missing = sources.missing_cleanfid_stats(spec.name)
    if missing:
        raise MissingStatistics(missing)
    name = sources.cleanfid_stats_name(mode=spec.cleanfid_mode)
    source = sources.cleanfid_stats_folder() / name
    with np.load(source, allow_pickle=False) as z:
        mu, sigma = z["mu"], z["sigma"]
    return save_reference(out, mu, sigma, protocol=spec.name, dataset="cifar10-train", images=50_000,
                          shape=(3, 32, 32), source=f"clean-fid precomputed {name}", source_sha256=sha256(source))


SHAPES = {"cifar10": (3, 32, 32), "imagenet64": (3, 64, 64)}


def file_reference(out, file, protocol, dataset):
    """Import published statistics (an .npz with ``mu`` and ``sigma``, e.g. EDM's fid-refs) measured with ``protocol``."""
    file = Path(file)
    if not file.is_file():
        raise MissingStatistics(f"reference statistics {file} not found: fetch them (EDM's: https://nvlabs-fi-cdn."
                                f"nvidia.com/edm/fid-refs/cifar10-32x32.npz or imagenet-64x64.npz) and put them there")
    with np.load(file, allow_pickle=False) as z:
        if "mu" not in z.files or "sigma" not in z.files:
            raise ConfigError(f"{file} holds {sorted(z.files)}, not mu and sigma: give reference statistics")
        mu, sigma = z["mu"], z["sigma"]
    if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
        raise ConfigError(f"{file}: mu {mu.shape} and sigma {sigma.shape} are not a mean and its covariance")
    return save_reference(out, mu, sigma, protocol=protocols.get(protocol).name, dataset=f"{dataset}-train",
                          images=-1, shape=SHAPES[dataset], source=f"imported {file.name}", source_sha256=sha256(file))


def dataset_reference(out, images, features, dataset, batch_size=500):
    """Statistics of every image of a uint8 (N, C, H, W) training set through ``features`` (an :class:`ImageFeatures`)."""
    feats = [features(images[i:i + batch_size]) for i in range(0, len(images), batch_size)]
    mu, sigma = frechet.statistics(np.concatenate(feats))
    return save_reference(out, mu, sigma, protocol=features.protocol, dataset=dataset, images=len(images),
                          shape=tuple(images.shape[1:]), source="computed from the training-set loader")
