"""What every method shares: the Target it returns, and how it noises data."""
import abc
from dataclasses import dataclass

import torch

from tract_repro.common.batch_random import as_batch_random


@dataclass
class Target:
    """One regression problem: the student's x̂(x_t, λ, cond) should match x̃ under weight w (all float64)."""

    x_t: torch.Tensor
    logsnr: torch.Tensor
    x_target: torch.Tensor
    weight: torch.Tensor
    cond: object = None  # a networks.conditioning.Cond (or class labels), passed to the student as given


@dataclass
class Networks:
    """The frozen denoisers a target may call: the teacher and the self-teacher (EMA of the student)."""

    teacher: object = None
    self_teacher: object = None


def add_noise(x, alpha, sigma, generator):
    """x_t = α·x + σ·ε with ε ~ N(0, I) drawn on the CPU (float64) from ``generator``, then moved to x's device.

    ``generator`` is the step's :class:`~tract_repro.common.batch_random.BatchRandom` (or a bare
    ``torch.Generator``, which draws for x alone).
    """
    eps = as_batch_random(generator, x.shape[0]).randn(x.shape[1:], dtype=torch.float64).to(x.device)
    return alpha * x + sigma * eps


def noise_at(x, t, grid, generator):
    """x_t = α_t·x + σ_t·ε at grid indices t; returns (x_t, λ_t, α_t, σ_t)."""
    logsnr, alpha, sigma = grid.at(t)
    return add_noise(x, alpha, sigma, generator), logsnr, alpha, sigma


def randint(low, high, n, generator):
    """n integers uniform in {low, …, high} (inclusive), one per sample, drawn on the CPU."""
    return as_batch_random(generator, n).randint(low, high)


class Method(abc.ABC):
    """Base of every method: a step schedule and a target function."""

    #: whether the run needs a teacher (a previous run) to start from
    needs_teacher = True
    #: momentum of the self-teacher EMA μ_S, or None if the method uses none
    self_teacher_momentum = None
    #: extra network inputs the student has and its teacher lacks (their branches start at zero)
    new_inputs = ()
    #: whether the teacher must have been trained with label dropout (its x̂(x_t, ∅) is used)
    guided_teacher = False

    def check(self, student, data):
        """Raise a one-line ConfigError if this method cannot train ``student`` on ``data``."""

    def sampling_cond(self, cond):
        """The conditioning the training loop's sample grids use (a w-conditioned student's adds its w)."""
        return cond

    @abc.abstractmethod
    def steps(self, T):
        """The step schedule S = (S₀, …, S_P) on a grid of T steps."""

    @abc.abstractmethod
    def __call__(self, x, cond, phase, nets, grid, generator):
        """The Target for a batch x (float64) in ``phase``.

        ``generator`` is a :class:`~tract_repro.common.batch_random.BatchRandom` for the samples of x
        (or a bare ``torch.Generator``): draw every random tensor from it, one row per sample, and
        draw the same sequence whatever the data, so that x may be any slice of a larger batch.
        """
