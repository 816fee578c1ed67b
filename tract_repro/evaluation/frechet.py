"""Feature statistics and the Fréchet distance, through clean-fid's own functions."""
import numpy as np
import torch
from cleanfid import fid as cleanfid

from tract_repro.sampling.images import to_uint8


def statistics(features):
    """(μ, Σ) of features (N, D) in float64, Σ unbiased (as clean-fid)."""
    feats = np.asarray(features, dtype=np.float64)
    return feats.mean(axis=0), np.cov(feats, rowvar=False)


def frechet_distance(stats_a, stats_b):
    """FD = ‖μ_a − μ_b‖² + tr(Σ_a + Σ_b − 2(Σ_a Σ_b)^½), clean-fid's implementation."""
    return float(cleanfid.frechet_distance(stats_a[0], stats_a[1], stats_b[0], stats_b[1]))


def extrapolated_distance(features, reference, n=50_000, halves=5, seed=0):
    """FD of ``features`` extrapolated to ``n`` samples by FD(N) ≈ FD∞ + c/N, as the official TRACT code's
    ``approximate_fid``: FD_n = FD_k + (FD_{k/2} − FD_k)·(k/n − 1), FD_{k/2} the median over ``halves`` random
    halves (seeded here; unseeded there).  With k = n it is FD_k."""
    features = np.asarray(features, dtype=np.float64)
    k = len(features)
    full = frechet_distance(statistics(features), reference)
    rng = np.random.default_rng(seed)
    half = float(np.median([frechet_distance(statistics(features[rng.permutation(k)[:k // 2]]), reference)
                            for _ in range(halves)]))
    return full + (half - full) * (k / n - 1)


def custom_features(images, feature_fn, batch_size=500):
    """Features of images (N, C, H, W) in [−1, 1] by clean-fid's batch path with a custom extractor.

    ``feature_fn`` takes a float batch in [0, 255] (clean-fid's convention); images are
    quantised to 8 bits first, as every FID protocol does.
    """
    chunks = []
    for i in range(0, len(images), batch_size):
        batch = to_uint8(images[i:i + batch_size]).float()
        chunks.append(cleanfid.get_batch_features(batch, feature_fn, torch.device("cpu")))
    return np.concatenate(chunks)


def classifier_feature_fn(classifier):
    """clean-fid-style extractor: [0, 255] floats → the classifier's features of x/127.5 − 1."""
    def fn(batch):
        with torch.no_grad():
            return classifier.features(batch / 127.5 - 1.0)
    return fn


def frechet_distance_psd(stats_a, stats_b):
    """FD = ‖μ_a − μ_b‖² + tr Σ_a + tr Σ_b − 2·Σ_i √λ_i(Σ_a^½ Σ_b Σ_a^½): :func:`frechet_distance` in its symmetric
    form (tr(Σ_a Σ_b)^½ = tr(Σ_a^½ Σ_b Σ_a^½)^½ for covariances), from two symmetric eigendecompositions.  Equal to
    clean-fid's to round-off; where a covariance is singular (fewer samples than features) its roots stay real,
    where the square root of the non-symmetric Σ_a Σ_b warns, and can fail on an imaginary part."""
    (mu_a, sigma_a), (mu_b, sigma_b) = stats_a, stats_b
    values, vectors = np.linalg.eigh(sigma_a)
    root_a = (vectors * np.sqrt(values.clip(min=0))) @ vectors.T
    middle = root_a @ sigma_b @ root_a
    roots = np.sqrt(np.linalg.eigvalsh((middle + middle.T) / 2).clip(min=0))
    diff = np.asarray(mu_a) - np.asarray(mu_b)
    return float(diff @ diff + np.trace(sigma_a) + np.trace(sigma_b) - 2 * roots.sum())


def class_conditional_distance(features, labels, real_features, real_labels, min_samples=2):
    """Class-conditional FD: (1/|C|)·Σ_{c ∈ C} FD(features of the samples made for class c, real features of class c),
    C the classes with at least ``min_samples`` generated and real samples (a covariance needs two).

    Returns dict(mean=…, per_class=[FD or None for each class 0..max label], generated_per_class=[counts],
    real_per_class=[counts]); ``mean`` is None when no class has enough samples.  A class usually has fewer
    samples than features, so each FD is :func:`frechet_distance_psd` (exact with a singular Σ).  FD's small-sample
    bias grows as the count per class falls: compare only values computed from the same counts.
    """
    features, real_features = np.asarray(features, dtype=np.float64), np.asarray(real_features, dtype=np.float64)
    labels, real_labels = np.asarray(labels).astype(int), np.asarray(real_labels).astype(int)
    classes = int(max(labels.max(initial=-1), real_labels.max(initial=-1))) + 1
    per_class, made, real = [], [], []
    for c in range(classes):
        mine, theirs = features[labels == c], real_features[real_labels == c]
        made.append(len(mine))
        real.append(len(theirs))
        enough = len(mine) >= min_samples and len(theirs) >= min_samples
        per_class.append(frechet_distance_psd(statistics(mine), statistics(theirs)) if enough else None)
    measured = [fd for fd in per_class if fd is not None]
    return dict(mean=float(np.mean(measured)) if measured else None, per_class=per_class,
                generated_per_class=made, real_per_class=real)
