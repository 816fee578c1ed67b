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
