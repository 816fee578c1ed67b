"""The small digits classifier whose penultimate features define digits-FD (method-spec §8, §11).

    python -m tract_repro.evaluation.classifier --workdir runs/digits_classifier
"""
from tract_repro.common.errors import ConfigError
from tract_repro.launching import warm

warm.forward(__name__, __spec__)  # under `python -m tract_repro.warm`: run in its warm server, not here

import argparse
from pathlib import Path

import gin
import torch
from torch import nn

from tract_repro.common.cli import command
from tract_repro.common.files import write_json
from tract_repro.data.digits import digits
from tract_repro.training.checkpoint import load, save_atomic


class DigitsClassifier(nn.Module):
    """conv 32 → conv 64 → pool → conv 64 → global mean: 64-d features, then a linear head to 10 classes."""

    feature_dim = 64

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.SiLU(), nn.Conv2d(32, 64, 3, padding=1), nn.SiLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 3, padding=1), nn.SiLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(64, 10)

    def features(self, x):
        """64-d features of images in [−1, 1], shape (N, 1, 8, 8)."""
        return self.body(x)

    def forward(self, x):
        return self.head(self.features(x))


#: the side of the images the classifier reads: scikit-learn's digits
RESOLUTION = 8


def at_classifier_resolution(images):
    """Images (N, 1, R, R) as the classifier reads them: R = 8 as they are; a multiple of 8 (the latent digits' 32×32
    decoded samples) area-averaged over (R/8)² blocks back to 8×8, which undoes exactly the nearest-neighbour
    upsampling of :func:`tract_repro.data.digits.upsample`."""
    side = images.shape[-1]
    if images.ndim != 4 or images.shape[1] != 1 or images.shape[-2] != side or side % RESOLUTION:
        raise ConfigError(f"digits-FD reads 1-channel square digits of side 8 or a multiple of 8, not images of shape "
                          f"{tuple(images.shape[1:])}: evaluate other images with python -m tract_repro.evaluation.fid")
    if side == RESOLUTION:
        return images
    return torch.nn.functional.avg_pool2d(images, side // RESOLUTION)


def split(n, seed, test_fraction):
    """A seeded train/test split of n indices."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_test = int(round(n * test_fraction))
    return perm[n_test:], perm[:n_test]


@gin.configurable
def train_classifier(workdir, epochs=40, batch_size=64, lr=2e-3, seed=0, test_fraction=0.2, min_accuracy=0.95,
                     threads=1):
    """Train on a seeded split, check the held-out accuracy, save classifier.pt and classifier.json."""
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    data = digits()
    train_idx, test_idx = split(len(data), seed, test_fraction)
    model = DigitsClassifier()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = train_idx[torch.randperm(len(train_idx), generator=gen)]
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            loss = nn.functional.cross_entropy(model(data.images[idx]), data.labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(data.images[test_idx]).argmax(1) == data.labels[test_idx]).float().mean().item()
    if accuracy < min_accuracy:
        raise ConfigError(f"the digits classifier reached only {accuracy:.3f} held-out accuracy (< {min_accuracy}): "
                         f"train longer (train_classifier.epochs) before using it for digits-FD")
    workdir = Path(workdir)
    save_atomic(model.state_dict(), workdir / "classifier.pt")
    info = dict(accuracy=accuracy, test_images=len(test_idx), epochs=epochs, seed=seed, feature_dim=model.feature_dim)
    write_json(workdir / "classifier.json", info)
    return model, info


def load_classifier(workdir):
    """The trained classifier of a classifier run directory, with a one-line error if it is missing."""
    weights = Path(workdir) / "classifier.pt"
    if not weights.is_file():
        raise ConfigError(f"digits classifier {weights} not found: train it first with "
                         f"`python -m tract_repro.evaluation.classifier --workdir {workdir}`")
    model = DigitsClassifier()
    model.load_state_dict(load(weights))
    return model.eval()


@command
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="runs/digits_classifier")
    parser.add_argument("--gin", action="append", default=[], help="binding, e.g. 'train_classifier.epochs = 60'")
    args = parser.parse_args(argv)
    from tract_repro import config

    config.parse(bindings=args.gin)
    _, info = train_classifier(args.workdir)
    print(f"digits classifier: held-out accuracy {info['accuracy']:.4f} on {info['test_images']} images → {args.workdir}")
    return 0


if __name__ == "__main__":
    from tract_repro.launching.process import exit_now

    exit_now(main())
