"""Export a finished run for use elsewhere: safetensors weights with a model card, or a diffusers pipeline.

    python -m tract_repro.export runs/digits_tract --out exports/digits_tract
    python -m tract_repro.export runs/digits_tract --format diffusers --out exports/digits_tract_diffusers
    python -m tract_repro.export RUN --out DIR --metrics results/digits/eval/ROW/s0.json

``--format safetensors`` (the default) writes ``model.safetensors`` (the inference EMA), ``config.gin``,
``run.json`` and ``README.md``, a Hugging Face model card with the method, schedule, teacher and its sha256,
training samples and the evaluations of these weights with their protocols; ``load_exported(DIR)``
(:mod:`tract_repro.exporting`) rebuilds the denoiser from them.  ``--format diffusers`` (VP runs with the PD UNet)
writes a diffusers pipeline folder with the same card: ``DiffusionPipeline.from_pretrained(DIR,
trust_remote_code=True)`` samples the run's K-step DDIM schedule, the same samples as ours from the same noise.
A latent run (a diffusers UNet) becomes a stock pipeline instead: ``StableDiffusionPipeline.from_pretrained(DIR)``
for a text model, its DDIMScheduler configured so that K steps are our K-step DDIM (docs/export.md).
Both need ``pip install 'tract-repro[export]'``.  ``--out`` must be new or empty; nothing is written unless the
whole export succeeds.  Errors print one line and exit with status 2.
"""
import argparse

from tract_repro.common.cli import command
from tract_repro.exporting import FORMATS, export_run


def _parser():
    parser = argparse.ArgumentParser(prog="python -m tract_repro.export", description=__doc__.splitlines()[0])
    parser.add_argument("run", help="a finished run directory (ema.pt, config.gin, run.json)")
    parser.add_argument("--format", choices=FORMATS, default="safetensors",
                        help="safetensors: weights, config and model card; diffusers: a diffusers pipeline folder too")
    parser.add_argument("--out", required=True, help="a new (or empty) folder for the export")
    parser.add_argument("--metrics", action="append", default=[], metavar="FILE.json",
                        help="an evaluation of this run to report in the card (repeatable); RUN/eval/*.json and "
                             "results/*/eval/**/*.json of these weights are found without it")
    return parser


@command
def main(argv=None):
    args = _parser().parse_args(argv)
    out, found = export_run(args.run, args.format, args.out, args.metrics)
    what = ", ".join(str(e.path) for e in found) if found else "none found (the card says not evaluated)"
    print(f"{out}: {args.format} export of {args.run} with its model card README.md; evaluations: {what}")
    return 0


if __name__ == "__main__":
    from tract_repro.launching.process import exit_now

    exit_now(main())
