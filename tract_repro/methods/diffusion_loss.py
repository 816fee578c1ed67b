"""Teacher training: the diffusion loss of Salimans & Ho (method-spec §3)."""
import gin
import torch

from tract_repro.common.batch_random import as_batch_random
from tract_repro.common.errors import ConfigError
from tract_repro.diffusion import weighting as weightings
from tract_repro.diffusion.edm import lognormal_logsnr
from tract_repro.methods.base import Method, Target, add_noise


@gin.configurable
class TeacherTraining(Method):
    """x_t from u ~ U[0, 1] (or i ~ U{1..T}, or EDM's log-normal σ), target x, weight w(λ); one phase."""

    needs_teacher = False

    def __init__(self, weighting="snr+1", continuous=True, sample_steps=64, time_distribution="uniform"):
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
        n = x.shape[0]
        rng = as_batch_random(generator, n)
        if self.time_distribution == "lognormal":  # EDM: ln σ ~ N(−1.2, 1.2²)
            logsnr = lognormal_logsnr(n, rng)
        elif self.continuous:
            u = rng.rand(dtype=torch.float64)
            logsnr = grid.schedule.logsnr(u)
        else:
            logsnr = grid.logsnr[rng.randint(1, grid.T).to(grid.logsnr.device)]
        logsnr = logsnr.to(x.device)
        alpha, sigma = grid.alpha_sigma(logsnr, x.ndim)
        x_t = add_noise(x, alpha, sigma, rng)
        return Target(x_t, logsnr, x, self.weight_fn(logsnr), cond)
