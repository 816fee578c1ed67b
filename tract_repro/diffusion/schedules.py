"""Noise schedules: log-SNR as a function of continuous time u ∈ [0, 1] and its T-grid.

A schedule knows its *process* (VP or VE), which maps a log-SNR λ to (α, σ) with
x_t = α·x + σ·ε.  Every sampler, method and loss talks in λ, so VP and VE teachers
share one denoiser contract D(x_t, λ, cond) (method-spec §1, §6).
"""
import math

import gin
import torch

from tract_repro.common.errors import ConfigError


def vp_alpha_sigma(logsnr):
    """VP: α² = sigmoid(λ), σ² = sigmoid(−λ) (method-spec §1)."""
    return torch.sigmoid(logsnr).sqrt(), torch.sigmoid(-logsnr).sqrt()


def ve_alpha_sigma(logsnr):
    """VE: α = 1, σ = exp(−λ/2), so λ = −2·ln σ (method-spec §6)."""
    return torch.ones_like(logsnr), torch.exp(-0.5 * logsnr)


PROCESSES = {"vp": vp_alpha_sigma, "ve": ve_alpha_sigma}


@gin.configurable
class CosineSchedule:
    """VP cosine log-SNR: λ(u) = −2·log tan(a·u + b), b = atan(e^{−λmax/2}), a = atan(e^{−λmin/2}) − b."""

    process = "vp"

    def __init__(self, logsnr_min=-20.0, logsnr_max=20.0):
        if not logsnr_min < logsnr_max:
            raise ConfigError(f"CosineSchedule needs logsnr_min < logsnr_max, got {logsnr_min}, {logsnr_max}")
        self.b = math.atan(math.exp(-0.5 * logsnr_max))
        self.a = math.atan(math.exp(-0.5 * logsnr_min)) - self.b

    def logsnr(self, u):
        """λ(u) for continuous time u ∈ [0, 1] (float64 recommended)."""
        return -2.0 * torch.log(torch.tan(self.a * u + self.b))

    def grid(self, T):
        """λ_i = λ(i/T) for i = 0..T, float64 (index 0 is the clean end)."""
        return self.logsnr(torch.arange(T + 1, dtype=torch.float64) / T)

    def alpha_sigma(self, logsnr):
        return vp_alpha_sigma(logsnr)
