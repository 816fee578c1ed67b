"""Evaluate finished runs: K-step samples → digits-FD, teacher fidelity, a PNG grid.

    python -m tract_repro.evaluate runs/digits_tract_1024_32_1 --steps 1 2
    python -m tract_repro.evaluate runs/digits_teacher --steps 1024 64 8 2 1 --samples 500
    python -m tract_repro.evaluate runs/x/s0 runs/x/s1 runs/x/s2 --out s0.json s1.json s2.json

Writes ``<run>/eval/metrics.json`` (a DVC metrics file) and ``<run>/eval/samples_<K>steps.png``, or
``OUT`` and ``OUT``'s stem + ``_<K>steps.png`` (:mod:`tract_repro.evaluation.metrics`).  Several runs
(a row's seeds) share one process: the classifier, the real-set statistics and the teacher reference
are loaded once.
"""
from tract_repro.common.errors import ConfigError
from tract_repro.launching import warm

warm.forward(__name__, __spec__)  # under `python -m tract_repro.warm`: run in its warm server, not here

import argparse

from tract_repro.common.cli import command
from tract_repro.evaluation.metrics import evaluate_run
from tract_repro.sampling.registry import SAMPLERS


def _parser():
    parser = argparse.ArgumentParser(prog="python -m tract_repro.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", metavar="RUN", help="finished run directories (e.g. a row's seeds)")
    parser.add_argument("--steps", type=int, nargs="+", default=[1], help="sampler step counts K to evaluate")
    parser.add_argument("--samples", type=int, default=1797, help="number of samples (one seed each)")
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--classifier", default="runs/digits_classifier")
    parser.add_argument("--reference-steps", type=int, default=64, help="teacher DDIM steps for teacher fidelity")
    parser.add_argument("--cache", default="runs/cache", help="where teacher references are cached")
    parser.add_argument("--out", nargs="+", help="metrics file of each RUN (default: RUN/eval/metrics.json)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of this process")
    parser.add_argument("--workers", type=int, default=1,
                        help="sample in this many forked one-thread processes (on a CPU: one per free core)")
    parser.add_argument("--w", type=float, nargs="+", metavar="W",
                        help="guidance weights w (x̂^w = (1+w)·x̂_c − w·x̂_∅; a guidance scale s is 1 + w): for a guided "
                             "teacher or a w-conditioned student")
    parser.add_argument("--sampler", choices=list(SAMPLERS), default="ddim",
                        help="; ".join(f"{s.name}: {s.description}" for s in SAMPLERS.values()))
    return parser


@command
def main(argv=None):
    args = _parser().parse_args(argv)
    for name in ("samples", "workers", "threads"):  # checked before anything is read or written
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name} {getattr(args, name)}: give at least 1")
    if any(k < 1 for k in args.steps) or args.first_seed < 0 or args.reference_steps < 1:
        raise ConfigError(f"--steps {' '.join(map(str, args.steps))} --first-seed {args.first_seed} --reference-steps "
                          f"{args.reference_steps}: give step counts of at least 1 and a first seed of at least 0")
    outs = args.out or [None] * len(args.runs)
    if len(outs) != len(args.runs):
        raise ConfigError(f"{len(args.runs)} runs but {len(outs)} --out files: give one --out per run")
    shared = {}
    for run, out in zip(args.runs, outs):
        metrics = evaluate_run(run, args.steps, args.samples, args.first_seed, args.classifier, args.reference_steps,
                               args.cache, out=out, threads=args.threads, sampler=args.sampler, shared=shared,
                               workers=args.workers, ws=args.w or (None,))
        for row in metrics["results"]:
            guided = "" if "w" not in row else (f"w {row['w']:g}  " + (f"accuracy {row['class_accuracy']:.3f}  digits-IS "
                                                                       f"{row['digits_is']:.2f}  " if "digits_is" in row else ""))
            print(f"{run}: {row['steps']:>4} steps ({row['nfe']} NFE)  {guided}digits-FD {row['digits_fd']:8.3f}  "
                  f"fidelity RMSE {row['fidelity_rmse']:.4f}  (noise floor {metrics['digits_fd_noise_floor']:.3f}"
                  + (f", reconstruction floor {metrics['digits_fd_reconstruction_floor']:.3f}"
                     if "digits_fd_reconstruction_floor" in metrics else "") + ")", flush=True)
    return 0


if __name__ == "__main__":
    from tract_repro.launching.process import exit_now

    exit_now(main())
