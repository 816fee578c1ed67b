"""EDM (Karras et al. 2022) VE-teacher maths as small pure functions (method-spec §6).

The EDM process is VE: x_σ = x + σ·ε, i.e. α = 1 and λ = −2·ln σ, so EDM's σ grid is just
another schedule in the project's λ convention (index 0 is the clean end, σ₀ = 0 ⇔ λ₀ = +inf).
The preconditioning coefficients are functions of σ; EDM's loss weighting is a function of λ
applied to the x-space (D-space) error like every other weighting, in
:mod:`tract_repro.diffusion.weighting` (``'edm'``).
"""
import gin
import torch

from tract_repro.common.batch_random import as_batch_random
from tract_repro.common.errors import ConfigError
from tract_repro.diffusion.schedules import ve_alpha_sigma

SIGMA_DATA = 0.5


def _f64(x):
    return torch.as_tensor(x, dtype=torch.float64)


@gin.configurable
class EDMSchedule:
    """EDM's ρ-schedule: σ(u) = (σ_min^{1/ρ} + u·(σ_max^{1/ρ} − σ_min^{1/ρ}))^ρ, VE (method-spec §6)."""

    process = "ve"

    def __init__(self, sigma_min=0.002, sigma_max=80.0, rho=7.0):
        if not 0 < sigma_min < sigma_max:
            raise ConfigError(f"EDMSchedule needs 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        if not rho > 0:
            raise ConfigError(f"EDMSchedule needs rho > 0, got {rho}")
        self.sigma_min, self.sigma_max, self.rho = float(sigma_min), float(sigma_max), float(rho)

    def sigma(self, u):
        """σ(u) = (σ_min^{1/ρ} + u·(σ_max^{1/ρ} − σ_min^{1/ρ}))^ρ: σ_min at u = 0, σ_max at u = 1 (float64)."""
        lo, hi = self.sigma_min ** (1.0 / self.rho), self.sigma_max ** (1.0 / self.rho)
        return (lo + _f64(u) * (hi - lo)) ** self.rho

    def logsnr(self, u):
        """λ(u) = −2·ln σ(u) for continuous time u ∈ [0, 1] (float64)."""
        return -2.0 * torch.log(self.sigma(u))

    def sigmas(self, T):
        """σ_0 = 0 and σ_i = σ((i−1)/(T−1)) for i = 1..T, ascending, float64 (method-spec §6).

        For T = 1 the single noisy point is σ_1 = σ_max (a one-step grid starts from pure noise).
        """
        if int(T) != T or T < 1:
            raise ConfigError(f"the EDM grid needs a positive integer T, got {T!r}")
        T = int(T)
        u = torch.ones(1, dtype=torch.float64) if T == 1 else torch.arange(T, dtype=torch.float64) / (T - 1)
        return torch.cat([torch.zeros(1, dtype=torch.float64), self.sigma(u)])

    def grid(self, T):
        """λ_i = −2·ln σ_i for i = 0..T, float64; λ_0 = +inf (σ_0 = 0, the clean end)."""
        return -2.0 * torch.log(self.sigmas(T))

    def alpha_sigma(self, logsnr):
        """VE: α = 1, σ = exp(−λ/2) (method-spec §6)."""
        return ve_alpha_sigma(logsnr)


def sigma_from_logsnr(logsnr):
    """σ = exp(−λ/2) (VE, α = 1; method-spec §6)."""
    return torch.exp(-0.5 * _f64(logsnr))


def logsnr_from_sigma(sigma):
    """λ = −2·ln σ (VE, α = 1; method-spec §6)."""
    return -2.0 * torch.log(_f64(sigma))


def c_skip(sigma, sigma_data=SIGMA_DATA):
    """c_skip = σ_d²/(σ² + σ_d²) (method-spec §6)."""
    return sigma_data ** 2 / (sigma ** 2 + sigma_data ** 2)


def c_out(sigma, sigma_data=SIGMA_DATA):
    """c_out = σ·σ_d/√(σ² + σ_d²) (method-spec §6)."""
    return sigma * sigma_data / (sigma ** 2 + sigma_data ** 2) ** 0.5


def c_in(sigma, sigma_data=SIGMA_DATA):
    """c_in = 1/√(σ² + σ_d²) (method-spec §6)."""
    return 1.0 / (sigma ** 2 + sigma_data ** 2) ** 0.5


def c_noise(sigma):
    """c_noise = ln(σ)/4 (method-spec §6)."""
    return torch.log(torch.as_tensor(sigma)) / 4.0


def lognormal_logsnr(n, generator, p_mean=-1.2, p_std=1.2):
    """EDM's training noise: ln σ ~ N(P_mean, P_std²), returned as λ = −2·ln σ (float64, method-spec §6).

    ``generator``: a torch.Generator or a BatchRandom for the n samples.
    """
    z = as_batch_random(generator, n).randn(dtype=torch.float64)
    return -2.0 * (p_mean + p_std * z)


__all__ = ["EDMSchedule", "SIGMA_DATA", "sigma_from_logsnr", "logsnr_from_sigma", "c_skip", "c_out", "c_in",
           "c_noise", "lognormal_logsnr"]
