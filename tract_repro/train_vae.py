"""Train the latent digits' autoencoder and write it as a diffusers folder with its reconstruction floor.

    python -m tract_repro.train_vae --out runs/digits_vae
    python -m tract_repro.train_vae --out runs/digits_vae --gin 'train_vae.steps = 4000' --gin 'train_vae.threads = 2'

Writes ``DIR/vae/`` (``AutoencoderKL.save_pretrained``, safetensors, its measured ``scaling_factor`` in the config),
``DIR/model_index.json``, ``DIR/training.json`` and ``DIR/reconstruction.json``: the digits-FD of the VAE's
encode → decode reconstructions of the real digits by the noise floor's protocol
(:func:`tract_repro.evaluation.metrics.reconstruction_floor`).  Rerun the same command after an interruption: it
resumes exactly from the newest checkpoint.  Then encode the digits with
``python -m tract_repro.encode_latents --model DIR --source digits:32 --out OUT``.
"""
import argparse
import sys
from pathlib import Path

from tract_repro.common.cli import command
from tract_repro.common.errors import ConfigError

RECONSTRUCTION = "reconstruction.json"


def reconstruction_record(out, images, classifier, weights_sha256):
    """The reconstruction floor of the VAE in ``out`` (weights ``weights_sha256``) on ``images`` (the data set it
    trained on), as written to ``out/reconstruction.json``."""
    import torch

    from tract_repro.common.files import sha256
    from tract_repro.data.autoencoder import reconstruct
    from tract_repro.evaluation.classifier import load_classifier
    from tract_repro.evaluation.metrics import reconstruction_floor

    recon = reconstruct(out, images.images)
    floor = reconstruction_floor(load_classifier(classifier), images.images, recon)
    rmse = (recon.clamp(-1, 1).double() - images.images.double()).square().mean().sqrt().item()
    return dict(floor, protocol="digits-FD (clean-fid's FD, digits classifier features) between the reconstructions "
                                "of one seeded half A of the real digits and the real half B, the halves of the noise "
                                "floor FD(real A, real B); reconstructions clipped to [-1, 1] and, like the real "
                                "digits, area-averaged to 8x8 for the classifier",
                reconstruction="z = posterior mean x scaling_factor in float32, x' = decode(z / scaling_factor)",
                reconstruction_rmse=rmse, images=images.name, count=len(images),
                classifier=str(classifier), classifier_sha256=sha256(Path(classifier) / "classifier.pt"),
                vae_weights_sha256=weights_sha256,
                torch=torch.__version__)


@command
def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m tract_repro.train_vae", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="the run's folder (new, empty, or this run to resume)")
    parser.add_argument("--gin", action="append", default=[],
                        help="a binding, e.g. 'train_vae.steps = 4000' or 'vae_architecture.latent_channels = 8'")
    parser.add_argument("--classifier", default="runs/digits_classifier",
                        help="the digits classifier run of the reconstruction floor's digits-FD")
    args = parser.parse_args(argv)

    from tract_repro import config
    from tract_repro.common.files import write_json
    from tract_repro.data.autoencoder import train_vae
    from tract_repro.data.latent_models import quiet_loading
    from tract_repro.evaluation.classifier import load_classifier

    config.parse(bindings=args.gin)
    load_classifier(args.classifier)  # a missing classifier stops here, before anything is trained or written
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file: choose a folder")
    quiet_loading()
    record, images = train_vae(out)
    result = reconstruction_record(out, images, args.classifier, record["weights_sha256"])
    write_json(out / RECONSTRUCTION, result)
    print(f"{out}: latents {record['latent_shape']}, scaling factor {record['scaling_factor']:.4f}, "
          f"{record['seconds']:.0f} s of training; reconstruction floor (digits-FD) "
          f"{result['digits_fd_reconstruction_floor']:.3f} (noise floor {result['digits_fd_noise_floor']:.3f}), "
          f"reconstruction RMSE {result['reconstruction_rmse']:.4f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
