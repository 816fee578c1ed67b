"""Per-sample random draws that do not depend on how a global batch is split.

A training step draws each random tensor (horizontal flips, t, ε, …) for the whole global batch
of B samples from one CPU generator, in a fixed order, exactly as one process always has; every
process, and every micro-batch of an accumulated step, then keeps its own rows [start, stop).
Sample b therefore gets the same flip, t and ε whether the batch runs in one process, on W ranks
or in k micro-batches.  With one process and no accumulation the generator sees exactly the
calls it always saw (``torch.randint(low, high + 1, (B,))``, ``torch.randn((B, C, H, W))``, …),
so existing runs stay bit-identical.

Methods never see ranks.  They receive a :class:`BatchRandom` where they used to receive a
generator and ask it for per-sample tensors.  Helpers that are still handed a bare
``torch.Generator`` (tests, benchmarks) wrap it with :func:`as_batch_random`, which draws for
exactly the batch at hand, as before.

By default every process draws the whole global batch's noise on its CPU, once per step (the
micro-batches of a step share it): about 1M float64 normals for CIFAR-10 at batch 256, but 25M
(200 MB) per rank for ImageNet 64×64 at a global batch of 2048.  With ``Device.noise = 'device'``
the step's generator lives on the training device instead, seeded by (seed, step) alone
(:func:`step_generator`): every rank still draws the whole global batch and keeps its rows, so the
split does not matter, but the draws stay on the GPU and resume needs no generator state.  A CUDA
generator draws other numbers than a CPU one: runs on the two devices get different noise.

Dropout is not drawn here: it uses torch's global RNG inside the network, so it does depend on
the rank and on the micro-batch split (see :mod:`tract_repro.training.distributed`).
"""
import torch

from tract_repro.common.errors import ConfigError


class StepRandom:
    """The random tensors of one optimisation step, drawn once for the global batch and shared by its slices.

    The first slice that asks for the i-th tensor draws it from ``generator``; later slices (the
    other micro-batches of an accumulated step) get the same tensor back, so the generator advances
    exactly as it would for one full-batch call.  Every slice must ask for the same sequence of
    draws; a slice that asks for something else raises (a method whose draws depend on its data).
    """

    def __init__(self, generator, batch_size):
        self.generator, self.batch_size = generator, int(batch_size)
        self._drawn = []  # [(what was asked, global tensor)]

    def slice(self, start=0, stop=None):
        """The view of samples [start, stop) of the global batch (default: all of it)."""
        return BatchRandom(self, start, self.batch_size if stop is None else stop)

    def draw(self, i, kind, shape, dtype=None, low=None, high=None):
        """The i-th tensor of the step, of size (batch_size, *shape), drawn on first request."""
        key = (kind, tuple(shape), dtype, low, high)
        if i < len(self._drawn):
            if self._drawn[i][0] != key:
                raise RuntimeError(f"random draw {i} of this step was {self._drawn[i][0]} for one slice of the batch "
                                   f"but {key} for another: a method's draws must not depend on its data")
            return self._drawn[i][1]
        size = (self.batch_size, *shape)
        device = None if self.generator is None else self.generator.device  # where the generator draws
        if kind == "randint":
            value = torch.randint(low, high + 1, size, generator=self.generator, device=device)
        elif kind == "rand":
            value = torch.rand(size, generator=self.generator, dtype=dtype, device=device)
        else:
            value = torch.randn(size, generator=self.generator, dtype=dtype, device=device)
        self._drawn.append((key, value))
        return value


class BatchRandom:
    """Per-sample random tensors for samples [start, stop) of a global batch; the rows of the other samples are skipped.

    Each call returns a tensor with one row per sample of the slice.  The calls are counted, so
    the k-th call of every slice refers to the same global draw.
    """

    def __init__(self, step, start, stop):
        if not 0 <= start < stop <= step.batch_size:
            raise ConfigError(f"slice [{start}, {stop}) is not inside a batch of {step.batch_size}")
        self.step, self.start, self.stop = step, int(start), int(stop)
        self._calls = 0

    def __len__(self):
        return self.stop - self.start

    def randint(self, low, high, shape=()):
        """Integers uniform in {low, …, high} (inclusive), one tensor of ``shape`` per sample."""
        return self._take("randint", shape, None, int(low), int(high))

    def rand(self, shape=(), dtype=None):
        """U[0, 1) per sample."""
        return self._take("rand", shape, dtype)

    def randn(self, shape=(), dtype=None):
        """N(0, 1) per sample."""
        return self._take("randn", shape, dtype)

    def _take(self, kind, shape, dtype, low=None, high=None):
        value = self.step.draw(self._calls, kind, shape, dtype, low, high)
        self._calls += 1
        if self.start == 0 and self.stop == self.step.batch_size:
            return value
        return value[self.start:self.stop].clone()  # a copy, so no slice can alter what another will be given


def as_batch_random(source, n):
    """``source`` as a :class:`BatchRandom` for a batch of ``n`` samples.

    A BatchRandom is returned as it is (and must hold ``n`` samples); a ``torch.Generator`` (or
    None, torch's global generator) is wrapped so that it draws for exactly these n samples.
    """
    if isinstance(source, BatchRandom):
        if len(source) != n:
            raise ConfigError(f"a random source for {len(source)} samples was used for a batch of {n}")
        return source
    if source is not None and not isinstance(source, torch.Generator):
        raise TypeError(f"expected a BatchRandom or a torch.Generator, got {type(source).__name__}")
    return StepRandom(source, n).slice()


def step_generator(seed, step, device="cpu"):
    """A generator on ``device`` for optimisation step ``step`` of a run seeded ``seed``: a function of the two
    alone, mixed by numpy's SeedSequence into 64 bits (a CPU generator keeps the low 32 of them)."""
    import numpy as np

    words = np.random.SeedSequence([int(seed), int(step), 0x5749]).generate_state(2, np.uint32)
    mixed = (int(words[0]) << 32 | int(words[1])) & (2**63 - 1)
    return torch.Generator(device=device).manual_seed(mixed)
