"""What every method shares: the Target it returns, and how it noises data."""
import abc
from dataclasses import dataclass

import torch

from tract_repro.common.batch_random import as_batch_random
from tract_repro.common.errors import ConfigError
from tract_repro.networks.conditioning import Cond, as_cond
from tract_repro.networks.guidance import takes_input


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
    """x_t = α·x + σ·ε with ε ~ N(0, I) drawn (float64) from ``generator``, then moved to x's device and dtype.

    ``generator`` is the step's :class:`~tract_repro.common.batch_random.BatchRandom` (or a bare
    ``torch.Generator``, which draws for x alone).
    """
    eps = as_batch_random(generator, x.shape[0]).randn(x.shape[1:], dtype=torch.float64).to(x.device)
    if x.dtype == torch.float64:
        return alpha * x + sigma * eps
    return alpha.to(x.dtype) * x + sigma.to(x.dtype) * eps.to(x.dtype)  # float32 targets (Device.precision)


def noise_at(x, t, grid, generator):
    """x_t = α_t·x + σ_t·ε at grid indices t; returns (x_t, λ_t, α_t, σ_t)."""
    logsnr, alpha, sigma = grid.at(t)
    return add_noise(x, alpha, sigma, generator), logsnr, alpha, sigma


def randint(low, high, n, generator):
    """n integers uniform in {low, …, high} (inclusive), one per sample, drawn on the CPU."""
    return as_batch_random(generator, n).randint(low, high)


class Method(abc.ABC):
    """The contract between a method and the one training loop: a step schedule and a target function.

    A method implements :meth:`steps` and :meth:`__call__` (a subclass without either cannot be
    made), and may override the class attributes below and :meth:`check`.  These are everything the
    loop, the run's record (``run.json``) and evaluation read of a method; nothing else is read.
    """

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

    def __new__(cls, *args, **kwargs):
        missing = sorted(getattr(cls, "__abstractmethods__", ()))
        if missing:  # ABC's own TypeError, as the one line a command prints, naming the fix
            raise ConfigError(f"method {cls.__name__} does not implement {' and '.join(missing)} of the Method contract: "
                              f"define them (docs/architecture.md, 'A method')")
        return super().__new__(cls)

    #: whether the run needs a teacher (a previous run) to start from
    needs_teacher = True
    #: momentum of the self-teacher EMA μ_S, or None if the method uses none
    self_teacher_momentum = None
    #: extra network inputs the student has and its teacher lacks (their branches start at zero)
    new_inputs = ()
    #: whether the teacher must have been trained with label dropout (its x̂(x_t, ∅) is used)
    guided_teacher = False
    #: (w_min, w_max): the student and its teacher take a guidance weight w, drawn per sample (stage 2
    #: of guided distillation: the same w for every teacher, self-teacher and student call), or None
    guidance = None
    #: label-dropout probability of a guided teacher's training (0: an unguided model)
    p_uncond = 0.0
    #: the loss weighting w(λ) of a diffusion loss, or None (it names the known divergences in errors)
    weight_fn = None
    #: whether the targets' teacher steps clip x̂ to [−1, 1] (only meaningful for data bounded there: pixels)
    clip = False

    @property
    def guided(self):
        """Whether the run involves classifier-free guidance: a guided teacher, or a w-conditioned student."""
        return self.p_uncond > 0 or self.w_range is not None

    def check(self, student, data):
        """Raise a one-line ConfigError if this method cannot train ``student`` on ``data``."""
        if self.guidance is not None and not takes_input(student, "w"):
            raise ConfigError(f"{type(self).__name__}.guidance = {self.guidance}: the student needs a w input "
                              f"(UNet.extra_conditions = ('w',)) and a stage-1 teacher")

    @property
    def w_range(self):
        """(w_min, w_max) the student is trained on, or None (recorded in run.json for evaluation)."""
        return self.guidance

    def with_guidance(self, cond, generator, n, device):
        """``cond`` with w ~ U[w_min, w_max] per sample added, if this method draws a guidance weight."""
        if self.guidance is None:
            return cond
        cond = as_cond(cond)
        return Cond(cond.labels, {**cond.extra, "w": draw_w(as_batch_random(generator, n), *self.guidance).to(device)})

    def sampling_w(self):
        """The w of the training loop's sample grids: 1 (within the training range) for a w-conditioned student."""
        return None if self.w_range is None else min(max(1.0, self.w_range[0]), self.w_range[1])

    def sampling_cond(self, cond):
        """The conditioning the training loop's sample grids use (a w-conditioned student's adds its w)."""
        w = self.sampling_w()
        if w is None:
            return cond
        return Cond(cond.labels, {**cond.extra, "w": torch.full(cond.labels.shape, float(w), dtype=torch.float64,
                                                                device=cond.labels.device)})


def draw_w(rng, w_min, w_max):
    """w ~ U[w_min, w_max] per sample (float64)."""
    return w_min + (w_max - w_min) * rng.rand(dtype=torch.float64)


def guidance_range(value, owner):
    """(w_min, w_max) from a gin binding such as (0, 4), or None; one line if it is not a range."""
    if value is None:
        return None
    try:
        w_min, w_max = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ConfigError(f"{owner}.guidance = {value!r}: give (w_min, w_max), e.g. (0, 4)") from None
    if not 0 <= w_min <= w_max:
        raise ConfigError(f"{owner}.guidance = {value!r}: give 0 ≤ w_min ≤ w_max, e.g. (0, 4)")
    return w_min, w_max
