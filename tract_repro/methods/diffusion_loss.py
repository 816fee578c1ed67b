"""Teacher training: the diffusion loss of Salimans & Ho (method-spec §3)."""
import gin
import torch

from tract_repro.common.batch_random import as_batch_random
from tract_repro.common.errors import ConfigError
from tract_repro.diffusion import weighting as weightings
from tract_repro.diffusion.edm import lognormal_logsnr
from tract_repro.methods.base import Method, Target, add_noise
from tract_repro.networks.conditioning import NULL_LABEL, Cond, as_cond


@gin.configurable
class TeacherTraining(Method):
    """x_t from u ~ U[0, 1] (or i ~ U{1..T}, or EDM's log-normal σ), target x, weight w(λ); one phase.

    ``p_uncond`` > 0 trains a guided teacher (method-spec §7): each sample's label is replaced by the
    null class ∅ with that probability (label dropout), so that the network also learns x̂(x_t, ∅).
    """

    needs_teacher = False

    def __init__(self, weighting="snr+1", continuous=True, sample_steps=64, time_distribution="uniform", p_uncond=0.0):
        if isinstance(p_uncond, bool) or not isinstance(p_uncond, (int, float)) or not 0.0 <= p_uncond < 1.0:
            raise ConfigError(f"TeacherTraining.p_uncond = {p_uncond!r}: give a probability in [0, 1), e.g. 0.1")
        self.p_uncond = float(p_uncond)
        if time_distribution not in ("uniform", "lognormal"):
            raise ConfigError(f"TeacherTraining.time_distribution = {time_distribution!r}: choose 'uniform' or 'lognormal' (EDM)")
        self.weight_fn = weightings.get(weighting)
        self.weighting = weighting
        self.continuous = continuous
        self.time_distribution = time_distribution
        self.sample_steps = int(sample_steps)

    def steps(self, T):
        """One phase; its 'student' is sampled with ``sample_steps`` DDIM steps in grids."""
        if T % self.sample_steps:
            raise ConfigError(f"TeacherTraining.sample_steps = {self.sample_steps} must divide T = {T}")
        return (T, self.sample_steps) if self.sample_steps < T else (T, T)

    def __call__(self, x, cond, phase, nets, grid, generator):
        rng = as_batch_random(generator, x.shape[0])
        x_t, logsnr = self.noised(x, grid, rng)
        if self.p_uncond > 0:
            cond = drop_labels(as_cond(cond), self.p_uncond, rng)
        return Target(x_t, logsnr, x, self.weight_fn(logsnr), cond)

    def noised(self, x, grid, rng):
        """(x_t, λ) of the diffusion loss: λ by the time distribution, then x_t = α·x + σ·ε."""
        n = x.shape[0]
        if self.time_distribution == "lognormal":  # EDM: ln σ ~ N(−1.2, 1.2²)
            logsnr = lognormal_logsnr(n, rng)
        elif self.continuous:
            u = rng.rand(dtype=torch.float64)
            logsnr = grid.schedule.logsnr(u)
        else:
            logsnr = grid.logsnr[rng.randint(1, grid.T).to(grid.logsnr.device)]
        logsnr = logsnr.to(x.device)
        alpha, sigma = grid.alpha_sigma(logsnr, x.ndim)
        return add_noise(x, alpha, sigma, rng), logsnr

    def check(self, student, data):
        # a network conditioned on more than classes (captions: num_classes 1) takes its ∅ from any labelled data
        labelled = data.num_classes > 1 or getattr(student, "num_classes", 1) <= 1
        if self.p_uncond > 0 and not (getattr(student, "conditional", False) and labelled):
            raise ConfigError("TeacherTraining.p_uncond > 0 trains a guided teacher, which needs class labels: use a "
                              "class-conditional data set and network (UNet.num_classes, UNet.null_class = True)")


def drop_labels(cond, p, rng):
    """Each sample's label replaced by the null class ∅ with probability p (one uniform draw per sample)."""
    if cond.labels is None:
        raise ConfigError("label dropout needs class labels: use a class-conditional data set")
    drop = rng.rand(dtype=torch.float64).to(cond.labels.device) < p
    return Cond(torch.where(drop, torch.full_like(cond.labels, NULL_LABEL), cond.labels), cond.extra)
