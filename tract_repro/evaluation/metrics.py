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
from tract_repro.evaluation.generate import generate, labels_from_seeds, rmse, teacher_reference
from tract_repro.evaluation.runs import load_run, per_weight_outputs
from tract_repro.networks.guidance import GuidedDenoiser, takes_input
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
                 shared=None, workers=1, ws=(None,)):
    """Metrics for each guidance weight w in ``ws`` and each K in ``steps``; returns the dict written to metrics.json.

    ``workers`` > 1: samples are drawn by that many forked one-thread processes (``threads`` is then 1).
    ``ws``: None (no guidance), or guidance weights for a guided teacher (x̂^w, two network calls a step)
    or a w-conditioned student (w as its input); class-conditional runs also get class accuracy and a
    digits Inception Score from the classifier.

    ``out``: the metrics file; with ``{w}`` in it, one file per guidance weight (``{w}`` replaced by w).

    ``shared``: a dict kept between calls, so that runs evaluated in one process share the classifier's
    real-set statistics and the teacher reference.
    """
    shared = {} if shared is None else shared
    torch.set_num_threads(1 if workers > 1 else threads)
    if samples < 1 or any(k < 1 for k in steps):
        raise ConfigError(f"evaluation needs at least one sample and one step, got {samples} samples, steps {list(steps)}")
    per_w = per_weight_outputs(out, ws)
    run = load_run(run_dir)
    teacher_dir = Path(run.info["teacher"]).parent if run.info.get("teacher") else run.path
    teacher = run if teacher_dir == run.path else load_run(teacher_dir)
    seeds = range(first_seed, first_seed + samples)
    shape, classes = run.data.shape, run.data.num_classes if run.denoiser.conditional else 1
    for k in steps:  # every step count and guidance weight is checked before anything is computed or cached
        registry.get(sampler).logsnrs(run.grid, k)
    for w in ws:
        conditioned(run, w), conditioned(teacher, w)
    key = ("real", str(classifier), data_digest(run.data))
    if key not in shared:
        model = load_classifier(classifier)
        shared[key] = (*digits_fd_reference(model, run.data), model)
    real_stats, floor, feature_fn, model = shared[key]
    reference_steps = reference_steps_on(teacher.grid.T, reference_steps)
    labels = labels_from_seeds(seeds, classes) if classes > 1 else None
    rows = {}
    for w in ws:
        out_w = per_w[w] if per_w else None if out is None else Path(out)
        out_dir = out_w.parent if out_w else run.path / "eval"
        denoiser, extra, calls = conditioned(run, w)
        key = ("reference", sha256(teacher.weights), reference_steps, first_seed, samples, w)
        if key not in shared:
            ref_denoiser, ref_extra, _ = conditioned(teacher, w)
            shared[key] = teacher_reference(ref_denoiser, teacher.weights, teacher.grid, reference_steps, seeds, shape,
                                            cache, classes, batch_size, workers, extra=ref_extra)
        reference = shared[key]
        for k in steps:
            own_reference = teacher is run and k == reference_steps and sampler == "ddim"
            x = reference if own_reference else generate(denoiser, run.grid, k, seeds, shape, classes, batch_size,
                                                         desc=f"{run.path.name} {k} steps", sampler=sampler,
                                                         workers=workers, extra=extra)
            fd = frechet.frechet_distance(frechet.statistics(frechet.custom_features(x, feature_fn)), real_stats)
            row = dict(steps=k, nfe=calls * registry.network_calls(sampler, k), digits_fd=fd, fidelity_rmse=rmse(x, reference))
            rows.setdefault(w, []).append(row if w is None else dict(w=w, **row, **class_metrics(model, x, labels)))
            suffix = f"{k}steps" if w is None else f"{k}steps_w{w:g}"
            name = (lambda tail: out_dir / (f"{out_w.stem}_{suffix}{tail}.png" if out_w else f"samples_{suffix}{tail}.png"))
            save_grid(x[:100], name(""), scale=4)
            if w is not None and labels is not None:
                images, columns = by_class(x, labels, classes)
                save_grid(images, name("_classes"), ncol=columns, scale=4)
    metrics = dict(run=str(run.path), method=run.info["method"], schedule_steps=run.info["schedule_steps"],
                   weights_sha256=sha256(run.weights), sampler=registry.get(sampler).description, ema="inference",
                   seeds=[first_seed, first_seed + samples - 1], samples=samples,
                   reference=dict(run=str(teacher.path), sampler="ddim", steps=reference_steps),
                   digits_fd_noise_floor=floor, results=[r for w in ws for r in rows[w]])
    if per_w:  # one file per guidance weight
        for w in ws:
            write_json(per_w[w], dict(metrics, results=rows[w]))
    else:
        write_json(Path(out) if out else run.path / "eval" / "metrics.json", metrics)
    return metrics


def conditioned(run, w):
    """(denoiser, extra inputs, network calls per step) that sample ``run`` at guidance weight ``w`` (None: as it is).

    A guided teacher (trained with label dropout) is wrapped in the guided denoiser, two predictions a step;
    a w-conditioned student gets w as its input, with a warning if it was trained on a range without w.
    """
    if w is None:
        if takes_input(run.denoiser, "w"):
            raise ConfigError(f"{run.path} takes a guidance weight w as an input: evaluate it with --w, e.g. --w 0 1 4")
        return run.denoiser, None, 1
    if takes_input(run.denoiser, "w"):
        low, high = run.info.get("w_range") or (w, w)
        if not low <= w <= high:
            print(f"warning: {run.path} was trained on w in [{low:g}, {high:g}]: it never saw w = {w:g}", flush=True)
        return run.denoiser, {"w": float(w)}, 1
    if run.info.get("p_uncond"):
        return GuidedDenoiser(run.denoiser), {"w": float(w)}, 2
    raise ConfigError(f"{run.path} takes no guidance weight (no w input, and not trained with label dropout): "
                      f"evaluate it without --w")


def class_metrics(classifier, x, labels):
    """Class accuracy (the classifier's class is the one asked for) and the digits Inception Score
    exp(E_x KL(p(y|x) ‖ p(y))) of class-conditional samples."""
    if labels is None:
        return {}
    with torch.no_grad():
        logits = torch.cat([classifier(x[i:i + 500].float()) for i in range(0, len(x), 500)]).double()
    p = torch.softmax(logits, 1)
    marginal = p.mean(0, keepdim=True)
    kl = (p * (torch.log(p.clamp_min(1e-30)) - torch.log(marginal.clamp_min(1e-30)))).sum(1)
    return dict(class_accuracy=(logits.argmax(1) == labels).double().mean().item(), digits_is=kl.mean().exp().item())


def by_class(x, labels, classes, per_class=10):
    """(images, columns): ``per_class`` samples of each class, one row per class (the first seeds that asked for
    it; a class with fewer samples is padded with blank cells)."""
    rows = []
    for c in range(classes):
        mine = x[labels == c][:per_class]
        rows += [mine, torch.ones((per_class - len(mine), *x.shape[1:]), dtype=x.dtype)]
    return torch.cat(rows), per_class


def data_digest(data):
    """Which real set a run was trained on: a digest of its images."""
    return hashlib.sha256(data.images.contiguous().numpy().tobytes()).hexdigest()
