"""The integer time grid i = 0..T of a schedule, with λ, α, σ looked up in float64."""
import torch

from tract_repro.common.errors import ConfigError


class TimeGrid:
    """λ_i, α_i, σ_i for i = 0..T (index 0 is the clean end), plus the schedule's continuous λ(u)."""

    def __init__(self, schedule, T):
        if int(T) != T or T < 1:
            raise ConfigError(f"the time grid needs a positive integer T, got {T!r}")
        self.schedule, self.T = schedule, int(T)
        self.logsnr = schedule.grid(self.T).to(torch.float64)
        self.alpha, self.sigma = schedule.alpha_sigma(self.logsnr)

    def to(self, device):
        """The grid's tables on ``device`` (indices may stay on the CPU)."""
        self.logsnr, self.alpha, self.sigma = (v.to(device) for v in (self.logsnr, self.alpha, self.sigma))
        return self

    def at(self, i):
        """(λ_i of shape (B,), α_i and σ_i of shape (B, 1, 1, 1)) for integer indices i of shape (B,)."""
        view = (-1, 1, 1, 1)
        i = i.to(self.logsnr.device)
        return self.logsnr[i], self.alpha[i].view(view), self.sigma[i].view(view)

    def alpha_sigma(self, logsnr, ndim=4):
        """(α, σ) for arbitrary λ of shape (B,), broadcastable against images."""
        alpha, sigma = self.schedule.alpha_sigma(logsnr)
        shape = (-1,) + (1,) * (ndim - 1)
        return alpha.view(shape), sigma.view(shape)
