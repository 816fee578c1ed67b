"""Evaluate finished runs: K-step DDIM samples → digits-FD (or FID), teacher fidelity, a PNG grid.

    python -m tract_repro.evaluate runs/digits_tract_1024_32_1 --steps 1 2
    python -m tract_repro.evaluate runs/digits_teacher --steps 1024 64 8 2 1 --samples 500
    python -m tract_repro.evaluate runs/x/s0 runs/x/s1 runs/x/s2 --out s0.json s1.json s2.json

Writes ``<run>/eval/metrics.json`` (a DVC metrics file) and ``<run>/eval/samples_<K>steps.png``, or
``OUT`` and ``OUT``'s stem + ``_<K>steps.png``.  Several runs (a row's seeds) share one process: the
classifier, the real-set statistics and the teacher reference are loaded once.
"""
from tract_repro import warm

warm.forward(__name__, __spec__)  # under `python -m tract_repro.warm`: run in its warm server, not here

import argparse
import json
import sys
from pathlib import Path

import torch

from tract_repro.evaluation import frechet
from tract_repro.evaluation.classifier import load_classifier, split
from tract_repro.evaluation.generate import generate, network_calls, rmse, teacher_reference
from tract_repro.training.checkpoint import sha256
from tract_repro.evaluation.runs import load_run
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
        raise ValueError(f"evaluation needs at least one sample and one step, got {samples} samples, steps {list(steps)}")
    run = load_run(run_dir)
    teacher_dir = Path(run.info["teacher"]).parent if run.info.get("teacher") else run.path
    teacher = run if teacher_dir == run.path else load_run(teacher_dir)
    seeds = range(first_seed, first_seed + samples)
    shape, classes = run.data.shape, run.data.num_classes if run.denoiser.conditional else 1
    reference_steps = reference_steps_on(teacher.grid.T, reference_steps)
    key = ("reference", sha256(teacher.weights), reference_steps, first_seed, samples)
    if key not in shared:
        shared[key] = teacher_reference(teacher.denoiser, teacher.weights, teacher.grid, reference_steps, seeds, shape,
                                        cache, classes, batch_size, workers)
    reference = shared[key]
    key = ("real", str(classifier), data_digest(run.data))
    if key not in shared:
        shared[key] = digits_fd_reference(load_classifier(classifier), run.data)
    real_stats, floor, feature_fn = shared[key]
    out_dir = Path(out).parent if out else run.path / "eval"
    rows = []
    for k in steps:
        own_reference = teacher is run and k == reference_steps and sampler == "ddim"
        x = reference if own_reference else generate(run.denoiser, run.grid, k, seeds, shape, classes, batch_size,
                                                     desc=f"{run.path.name} {k} steps", sampler=sampler, workers=workers)
        fd = frechet.frechet_distance(frechet.statistics(frechet.custom_features(x, feature_fn)), real_stats)
        rows.append(dict(steps=k, nfe=network_calls(sampler, k), digits_fd=fd, fidelity_rmse=rmse(x, reference)))
        grid_name = f"{Path(out).stem}_{k}steps.png" if out else f"samples_{k}steps.png"
        save_grid(x[:100], out_dir / grid_name, scale=4)
    metrics = dict(run=str(run.path), method=run.info["method"], schedule_steps=run.info["schedule_steps"],
                   weights_sha256=sha256(run.weights), sampler="ddim (clipped x̂)" if sampler == "ddim" else "heun (EDM, deterministic)", ema="inference",
                   seeds=[first_seed, first_seed + samples - 1], samples=samples,
                   reference=dict(run=str(teacher.path), sampler="ddim", steps=reference_steps),
                   digits_fd_noise_floor=floor, results=rows)
    out_file = Path(out) if out else out_dir / "metrics.json"
    out_file.parent.mkdir(parents=True, exist_ok=True)
    out_file.write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def data_digest(data):
    """Which real set a run was trained on: a digest of its images."""
    import hashlib

    return hashlib.sha256(data.images.contiguous().numpy().tobytes()).hexdigest()


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m tract_repro.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", metavar="RUN", help="finished run directories (e.g. a row's seeds)")
    parser.add_argument("--steps", type=int, nargs="+", default=[1], help="DDIM step counts K to evaluate")
    parser.add_argument("--samples", type=int, default=1797, help="number of samples (one seed each)")
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--classifier", default="runs/digits_classifier")
    parser.add_argument("--reference-steps", type=int, default=64, help="teacher DDIM steps for teacher fidelity")
    parser.add_argument("--cache", default="runs/cache", help="where teacher references are cached")
    parser.add_argument("--out", nargs="+", help="metrics file of each RUN (default: RUN/eval/metrics.json)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of this process")
    parser.add_argument("--workers", type=int, default=1,
                        help="sample in this many forked one-thread processes (on a CPU: one per free core)")
    parser.add_argument("--sampler", choices=["ddim", "heun"], default="ddim",
                        help="ddim: K clipped DDIM steps on the training grid; heun: EDM's K-step Heun sampler")
    args = parser.parse_args(argv)
    outs = args.out or [None] * len(args.runs)
    if len(outs) != len(args.runs):
        print(f"error: {len(args.runs)} runs but {len(outs)} --out files: give one --out per run", file=sys.stderr)
        return 2
    shared = {}
    for run, out in zip(args.runs, outs):
        try:
            metrics = evaluate_run(run, args.steps, args.samples, args.first_seed, args.classifier, args.reference_steps,
                                   args.cache, out=out, threads=args.threads, sampler=args.sampler, shared=shared,
                                   workers=args.workers)
        except ValueError as exc:
            print(f"error: {str(exc).strip().splitlines()[0]}", file=sys.stderr)
            return 2
        for row in metrics["results"]:
            print(f"{run}: {row['steps']:>4} steps ({row['nfe']} NFE)  digits-FD {row['digits_fd']:8.3f}  "
                  f"fidelity RMSE {row['fidelity_rmse']:.4f}  (noise floor {metrics['digits_fd_noise_floor']:.3f})",
                  flush=True)
    return 0


if __name__ == "__main__":
    from tract_repro.process import exit_now

    exit_now(main())
