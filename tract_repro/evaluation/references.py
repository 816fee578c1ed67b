"""Reference statistics of a training set for FID (method-spec §8): μ and Σ of its Inception features as an ``.npz``
(``mu``, ``sigma`` and what they were computed from), written atomically; every result records the file's sha256.

CIFAR-10's come from clean-fid's precomputed statistics of the protocol's network and input path (never
downloaded), ImageNet 64's are computed from our training-set loader, and published ones (EDM's ``fid-refs``)
are imported from their ``.npz``.
"""
import zipfile
from pathlib import Path

import numpy as np

from tract_repro.common.errors import ConfigError, one_line
from tract_repro.common.files import sha256, write_atomic
from tract_repro.evaluation import frechet, protocols, sources


class MissingStatistics(ConfigError):
    """Reference statistics are not on disk."""


def save_reference(path, mu, sigma, **meta):
    """Reference statistics as an .npz (mu, sigma, and strings/ints saying what they come from), written atomically."""
    return write_atomic(path, lambda f: np.savez(f, mu=np.asarray(mu, np.float64), sigma=np.asarray(sigma, np.float64),
                                                 **{k: np.asarray(v) for k, v in meta.items()}))


MAKE_ONE = "make one with `python -m tract_repro.evaluation.fid reference ...` (dvc repro runs that stage)"


def read_statistics(path, fix=MAKE_ONE):
    """(μ, Σ, {other key: array}) of an .npz holding ``mu`` (D,) and ``sigma`` (D, D), read without unpickling
    anything; a file that is not one raises ConfigError in one line that ends with ``fix``."""
    path = Path(path)
    try:
        z = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile):  # text, a pickle, a torn or foreign file
        raise ConfigError(f"{path} is not a reference-statistics .npz (mu and sigma): {fix}") from None
    if not isinstance(z, np.lib.npyio.NpzFile):  # a bare .npy array
        raise ConfigError(f"{path} is a single .npy array, not a reference-statistics .npz with mu and sigma: {fix}")
    with z:
        if "mu" not in z.files or "sigma" not in z.files:
            raise ConfigError(f"{path} holds {sorted(z.files)}, not mu and sigma: it is not a reference-statistics "
                              f".npz; {fix}")
        try:
            arrays = {k: z[k] for k in z.files}
        except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:  # an object array, a torn member
            raise ConfigError(f"{path} is not a reference-statistics .npz ({one_line(exc)}): {fix}") from None
    mu, sigma = arrays.pop("mu"), arrays.pop("sigma")
    if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)) or not (np.issubdtype(mu.dtype, np.number)
                                                                 and np.issubdtype(sigma.dtype, np.number)):
        raise ConfigError(f"{path}: mu {mu.shape} and sigma {sigma.shape} are not a mean and its covariance: {fix}")
    return mu, sigma, arrays


def load_reference(path):
    """(μ, Σ), metadata (with the file's sha256) of reference statistics written by :func:`save_reference`."""
    path = Path(path)
    if not path.is_file():
        raise MissingStatistics(f"reference statistics {path} not found: compute them with "
                                f"`python -m tract_repro.evaluation.fid reference ...` (dvc repro runs that stage)")
    mu, sigma, rest = read_statistics(path)
    meta = {k: v.item() if v.ndim == 0 else v.tolist() for k, v in rest.items()}
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
    mu, sigma, _ = read_statistics(file, "give published statistics with mu and sigma (e.g. EDM's fid-refs)")
    return save_reference(out, mu, sigma, protocol=protocols.get(protocol).name, dataset=f"{dataset}-train",
                          images=-1, shape=SHAPES[dataset], source=f"imported {file.name}", source_sha256=sha256(file))


def dataset_reference(out, images, features, dataset, batch_size=500):
    """Statistics of every image of a uint8 (N, C, H, W) training set through ``features`` (an :class:`ImageFeatures`)."""
    feats = [features(images[i:i + batch_size]) for i in range(0, len(images), batch_size)]
    mu, sigma = frechet.statistics(np.concatenate(feats))
    return save_reference(out, mu, sigma, protocol=features.protocol, dataset=dataset, images=len(images),
                          shape=tuple(images.shape[1:]), source="computed from the training-set loader")


def latent_reference(out, folder, features, batch_size=500):
    """Statistics of the images an encoded folder was encoded from (e.g. COCO 2014 validation for FID-30K), streamed
    from its source as the encoder read them (centre crop and resize to the encoded resolution), never all in memory."""
    from tqdm import tqdm

    from tract_repro.data.latents import LatentArrays
    from tract_repro.sampling.images import to_uint8

    data = LatentArrays(folder)
    feats = [features(to_uint8(x)) for x in tqdm(data.image_batches(batch_size), desc=f"reference {folder}",
                                                 total=-(-len(data) // batch_size), disable=None)]
    mu, sigma = frechet.statistics(np.concatenate(feats))
    return save_reference(out, mu, sigma, protocol=features.protocol, dataset=f"latents:{data.manifest['source']['path']}",
                          images=len(data), shape=tuple(data.image_shape),
                          source=f"the images encoded into {folder} ({data.manifest['source']['kind']} source, "
                                 f"{data.manifest['resolution']} px)")
