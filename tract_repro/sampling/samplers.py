"""Deterministic samplers sharing one signature (k-diffusion style).

``sampler(denoiser, x, logsnrs, alpha_sigma, cond=None)`` starts from x at noise level
λs[0] and walks down the sequence λs (increasing λ, i.e. decreasing noise).
"""
import torch

from tract_repro.common.errors import ConfigError
from tract_repro.diffusion.ddim import ddim_step


def grid_logsnrs(grid, steps):
    """λ at grid indices T, T − T/K, …, 0 for a K-step sampler (K must divide T)."""
    if steps < 1 or grid.T % steps:
        raise ConfigError(f"{steps} sampling steps do not divide T = {grid.T}: use a divisor of T")
    return grid.logsnr[torch.arange(grid.T, -1, -(grid.T // steps))]


def noise_from_seeds(seeds, shape):
    """One standard-normal draw per seed, so samples don't depend on batch size or process count."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s)),
                                    dtype=torch.float64) for s in seeds])


@torch.no_grad()
def ddim(denoiser, x, logsnrs, alpha_sigma, cond=None, clip=True):
    """DDIM with x̂ clipped to [−1, 1] at every step (method-spec §2); unclipped if not ``clip`` (latents)."""
    n = x.shape[0]
    for lam_t, lam_s in zip(logsnrs[:-1], logsnrs[1:]):
        lam_t, lam_s = lam_t.expand(n), lam_s.expand(n)
        alpha_t, sigma_t = alpha_sigma(lam_t)
        alpha_s, sigma_s = alpha_sigma(lam_s)
        x = ddim_step(x, denoiser(x, lam_t, cond), alpha_t, sigma_t, alpha_s, sigma_s, clip=clip)
    return x
