"""An in-memory image dataset and its seeded, resumable order."""
from dataclasses import dataclass

import torch

from tract_repro.common.batch_random import as_batch_random


@dataclass
class ImageArrays:
    """Images (N, C, H, W), float in [−1, 1] or uint8 in [0, 255], and integer labels (N,).

    ``hflip`` flips each drawn sample left-right with probability ½ (CIFAR-10 training), drawn
    from the step's random source (the method's generator) so that a resumed run flips the same
    samples, and a sample flips alike whichever rank or micro-batch it lands in.
    """

    images: torch.Tensor
    labels: torch.Tensor
    num_classes: int
    name: str = ""
    hflip: bool = False

    def __len__(self):
        return self.images.shape[0]

    @property
    def shape(self):
        return tuple(self.images.shape[1:])

    def batch(self, idx, generator=None):
        """(x float64 in [−1, 1], labels) for dataset indices ``idx``.

        ``generator``: a BatchRandom for these samples, or a torch.Generator (or None) drawing for them alone.
        """
        x = self.images[idx]
        x = x.double() / 127.5 - 1.0 if x.dtype == torch.uint8 else x.double()
        if self.hflip:
            flip = (as_batch_random(generator, len(idx)).rand() < 0.5).to(x.device)  # drawn on the CPU or the GPU
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        return x, self.labels[idx]

    #: images, not the encodings of images: ``decode`` is the identity and ``pixels()`` the data set itself
    encoded = False

    def decode(self, x):
        """The images of samples ``x`` of this data set: x itself (an encoded data set decodes its latents)."""
        return x

    def pixels(self):
        """The images this data set's samples are (of an encoded data set: the images it encoded): itself."""
        return self


class EpochOrder:
    """Epoch e visits the data in a permutation seeded by (seed, e); position = samples seen.

    The order is a pure function of (seed, sample index), so the data position is restored
    exactly from the sample count alone.
    """

    def __init__(self, n, seed):
        self.n, self.seed = n, seed
        self._epoch, self._perm = None, None

    def _permutation(self, epoch):
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=g)
        return self._perm

    def indices(self, start, count):
        """Dataset indices of samples start, …, start + count − 1."""
        out, pos = [], start
        while len(out) < count:
            epoch, offset = divmod(pos, self.n)
            take = min(count - len(out), self.n - offset)
            out.append(self._permutation(epoch)[offset:offset + take])
            pos += take
            if sum(len(o) for o in out) >= count:
                break
        return torch.cat(out)
