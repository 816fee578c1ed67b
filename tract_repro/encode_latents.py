"""Encode an image (and caption) source once into latents with a diffusers model folder's own VAE.

``python -m tract_repro.encode_latents --model MODEL_FOLDER --source SRC --out OUT_DIR`` writes
``OUT_DIR/latents.json`` and fixed-size ``.npy`` shards: z = posterior mean (or a seeded sample) of the
folder's ``AutoencoderKL`` × its scaling factor and, for a Stable Diffusion folder, the CLIP text encoder's
caption embeddings and the empty prompt's ∅.  Rerun the same command after an interruption: it continues
after the last complete shard, to the same bytes.  ``--executor local|slurm`` runs it as a job and waits
(SLURM: one task on one GPU with the ``slurm.*`` options of ``--cluster``), as the paper pipeline's encode stages do.  Train on it with ``train.dataset = @latents`` and
``latents.folder = 'OUT_DIR'``.

``--source digits:32`` encodes scikit-learn's digits upsampled to 32×32 (nearest neighbour, 1 channel) with their
labels, made in memory, e.g. with the latent digits' VAE of ``python -m tract_repro.train_vae``.
"""
import argparse
import sys

from tract_repro.common.cli import command


def _device(name):
    import torch

    return name or ("cuda" if torch.cuda.is_available() else "cpu")


def _parser():
    parser = argparse.ArgumentParser(prog="python -m tract_repro.encode_latents", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="diffusers model folder (vae/, and text_encoder/ + tokenizer/ "
                                                       "for captions)")
    parser.add_argument("--source", required=True, help="digits:R (the digits upsampled to R×R), a folder with "
                                                        "captions.jsonl, a folder of WebDataset .tar shards, or a "
                                                        "shard path or brace pattern")
    parser.add_argument("--out", required=True, help="output folder (new, empty, or this encoding to resume)")
    parser.add_argument("--resolution", type=int, default=None, help="image side in pixels (default: digits:R's R, "
                                                                     "else the VAE's sample_size)")
    parser.add_argument("--posterior", default="mean", choices=["mean", "sample"],
                        help="the posterior's mean, or a sample seeded per sample index")
    parser.add_argument("--seed", type=int, default=0, help="seed of --posterior sample")
    parser.add_argument("--batch", type=int, default=32, help="images per encoder call")
    parser.add_argument("--shard-size", type=int, default=1024, help="samples per shard")
    parser.add_argument("--latent-dtype", default="float32", choices=["float32", "float16"])
    parser.add_argument("--num-classes", type=int, default=None,
                        help="classes of labelled data without text (default: largest label + 1)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--workers", type=int, default=1, help="image decoding threads")
    parser.add_argument("--executor", choices=["inline", "local", "slurm"], default="inline",
                        help="where to encode: here, a local submitit job, or one SLURM task on one GPU (waited for)")
    parser.add_argument("--cluster", metavar="FILE.gin", help="executor options (slurm.*), e.g. gin/paper/cluster.gin")
    parser.add_argument("--gin", action="append", default=[], metavar="'name = value'", help="executor bindings")
    return parser


def run(args):
    """Encode as the parsed command line asks, in this process."""
    from tract_repro.data.latent_encoding import encode
    from tract_repro.data.latent_models import quiet_loading

    quiet_loading()
    manifest = encode(args.model, args.source, args.out, resolution=args.resolution, posterior=args.posterior,
                      seed=args.seed, batch=args.batch, shard_size=args.shard_size, latent_dtype=args.latent_dtype,
                      device=_device(args.device), num_classes=args.num_classes, workers=args.workers)
    print(f"{args.out}: {manifest['count']} latents {manifest['latent_shape']} ({manifest['conditioning']} "
          f"conditioning)", flush=True)
    return 0


def _job(argv):
    """The body of a submitted encoding job: the same command, inline."""
    return run(_parser().parse_args(argv))


@command
def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = _parser().parse_args(argv)
    if args.executor == "inline":
        return run(args)
    from tract_repro.encode_latents import _job as job_body  # by its module name, also when run as __main__
    from tract_repro.launching import commands

    commands.submit(job_body, argv, args.executor, args.cluster, args.gin, commands.job_folder(args.out),
                    "tract-encode")
    return 0


if __name__ == "__main__":
    sys.exit(main())
