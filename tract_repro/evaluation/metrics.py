"""A finished run's metrics at digits scale: K-step samples → digits-FD, teacher fidelity, a PNG grid.

:func:`evaluate_run` writes ``<run>/eval/metrics.json`` (a DVC metrics file) and
``<run>/eval/samples_<K>steps.png``, or ``OUT`` and ``OUT``'s stem + ``_<K>steps.png``.  Runs
evaluated in one process (a row's seeds) share the classifier, the real-set statistics and the
teacher reference.  The command is ``python -m tract_repro.evaluate``.
"""
import hashlib
from pathlib import Path

import torch

from tract_repro.common.errors import ConfigError
from tract_repro.common.files import sha256, write_json
from tract_repro.evaluation import frechet
from tract_repro.evaluation.classifier import load_classifier, split
from tract_repro.evaluation.generate import generate, rmse, teacher_reference
from tract_repro.evaluation.runs import load_run
from tract_repro.sampling import registry
from tract_repro.sampling.images import save_grid


def digits_fd_reference(classifier, data, seed=0):
    """Real-set statistics, and the noise floor: FD between two seeded halves of the real set."""
    feature_fn = frechet.classifier_feature_fn(classifier)
    real = frechet.custom_features(data.images, feature_fn)
    a, b = split(len(real), seed, 0.5)
    floor = frechet.frechet_distance(frechet.statistics(real[a.numpy()]), frechet.statistics(real[b.numpy()]))
    return frechet.statistics(real), floor, feature_fn


def reference_steps_on(T, wanted):
    """The teacher's reference step count on its own grid: the largest divisor of T not above ``wanted``
    (64 on a VP grid of 1024; all 40 steps of an EDM grid of T = 40)."""
    return max(k for k in range(1, min(int(wanted), T) + 1) if T % k == 0)


def evaluate_run(run_dir, steps=(1,), samples=1797, first_seed=0, classifier="runs/digits_classifier",
                 reference_steps=64, cache="runs/cache", batch_size=500, out=None, threads=1, sampler="ddim",
                 shared=None, workers=1):
    """Metrics for each K in ``steps``; returns the dict written to metrics.json.

    ``workers`` > 1: samples are drawn by that many forked one-thread processes (``threads`` is then 1).

    ``shared``: a dict kept between calls, so that runs evaluated in one process share the classifier's
    real-set statistics and the teacher reference.
    """
    shared = {} if shared is None else shared
    torch.set_num_threads(1 if workers > 1 else threads)
    if samples < 1 or any(k < 1 for k in steps):
        raise ConfigError(f"evaluation needs at least one sample and one step, got {samples} samples, steps {list(steps)}")
    run = load_run(run_dir)
    teacher_dir = Path(run.info["teacher"]).parent if run.info.get("teacher") else run.path
    teacher = run if teacher_dir == run.path else load_run(teacher_dir)
    seeds = range(first_seed, first_seed + samples)
    shape, classes = run.data.shape, run.data.num_classes if run.denoiser.conditional else 1
    for k in steps:  # every step count is checked before anything is computed or cached
        registry.get(sampler).logsnrs(run.grid, k)
    key = ("real", str(classifier), data_digest(run.data))
    if key not in shared:
        shared[key] = digits_fd_reference(load_classifier(classifier), run.data)
    real_stats, floor, feature_fn = shared[key]
    reference_steps = reference_steps_on(teacher.grid.T, reference_steps)
    key = ("reference", sha256(teacher.weights), reference_steps, first_seed, samples)
    if key not in shared:
        shared[key] = teacher_reference(teacher.denoiser, teacher.weights, teacher.grid, reference_steps, seeds, shape,
                                        cache, classes, batch_size, workers)
    reference = shared[key]
    out_dir = Path(out).parent if out else run.path / "eval"
    rows = []
    for k in steps:
        own_reference = teacher is run and k == reference_steps and sampler == "ddim"
        x = reference if own_reference else generate(run.denoiser, run.grid, k, seeds, shape, classes, batch_size,
                                                     desc=f"{run.path.name} {k} steps", sampler=sampler, workers=workers)
        fd = frechet.frechet_distance(frechet.statistics(frechet.custom_features(x, feature_fn)), real_stats)
        rows.append(dict(steps=k, nfe=registry.network_calls(sampler, k), digits_fd=fd, fidelity_rmse=rmse(x, reference)))
        grid_name = f"{Path(out).stem}_{k}steps.png" if out else f"samples_{k}steps.png"
        save_grid(x[:100], out_dir / grid_name, scale=4)
    metrics = dict(run=str(run.path), method=run.info["method"], schedule_steps=run.info["schedule_steps"],
                   weights_sha256=sha256(run.weights), sampler=registry.get(sampler).description, ema="inference",
                   seeds=[first_seed, first_seed + samples - 1], samples=samples,
                   reference=dict(run=str(teacher.path), sampler="ddim", steps=reference_steps),
                   digits_fd_noise_floor=floor, results=rows)
    write_json(Path(out) if out else out_dir / "metrics.json", metrics)
    return metrics


def data_digest(data):
    """Which real set a run was trained on: a digest of its images."""
    return hashlib.sha256(data.images.contiguous().numpy().tobytes()).hexdigest()
