"""A tiny latent data set for the engine's tests: seeded random latents with class labels or caption embeddings.

``batch`` returns each sample's conditioning as a whole :class:`Cond` (labels, and ``extra['text']`` (B, L, D) for
a text model), and ``grid_cond(n)`` the conditioning of the training loop's sample grids (recorded in
``grid_calls``): the two hooks a latent data set offers the loop.
"""
import gin
import torch

from tract_repro.networks.conditioning import Cond


class TinyLatents:
    name = "tiny-latents"
    bounded = False  # latents: samplers leave x̂ unclipped, as for LatentArrays

    def __init__(self, n, channels, size, num_classes, text_shape, seed):
        g = torch.Generator().manual_seed(seed)
        self.latents = torch.randn(n, channels, size, size, generator=g)
        self.num_classes = 1 if text_shape else num_classes
        self.labels = torch.randint(self.num_classes, (n,), generator=g)
        self.text = bool(text_shape)  # captioned, as LatentArrays.text says
        self.embeddings = torch.randn(n, *text_shape, generator=g) if text_shape else None
        self.grid_calls = []

    def __len__(self):
        return self.latents.shape[0]

    @property
    def shape(self):
        return tuple(self.latents.shape[1:])

    def cond(self, rows):
        return Cond(self.labels[rows], {"text": self.embeddings[rows]} if self.text else {})

    def batch(self, idx, generator=None):
        return self.latents[idx].double(), self.cond(idx)

    def grid_cond(self, n):
        self.grid_calls.append(n)
        return self.cond(torch.arange(n) % len(self))


#: the settings every tiny latent run of the tests shares (one thread on the CPU, small logs and grids); a run file
#: appends it and sets its own train.checkpoint_every
CPU_RUN = """train.threads = 1
train.log_every = 4
train.grid_size = 2
train.grid_max_steps = 4
train.tensorboard = False
train.device = @Device()
Device.name = 'cpu'
adam.lr = 1e-3
inference_ema_momentum.momentum = 0.5
"""


@gin.configurable
def tiny_latents(n=32, channels=4, size=8, num_classes=10, text_shape=None, seed=0):
    """``n`` latents (channels, size, size) ~ N(0, I); class labels, or (text_shape = (L, D)) caption embeddings."""
    return TinyLatents(n, channels, size, num_classes, tuple(text_shape) if text_shape else None, seed)
