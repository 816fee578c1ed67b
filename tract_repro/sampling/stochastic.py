"""Meng et al.'s stochastic N-step sampler (method-spec §7; guided-notes §2).

On the N + 1 noise levels λ_0 < … of an N-step grid (noisiest first): from each level a deterministic
jump two levels down, to k, then forward noising one level back up, to s,

    z_s = (α_s/α_k)·z_k + σ_{s|k}·ξ,   σ²_{s|k} = (1 − e^{λ_s − λ_k})·σ_s²,

which leaves the marginal at s exactly what it is under the forward process if z_k has the marginal
at k.  The last step, one level to the clean end, is deterministic.  N steps cost N network calls.
The jumps of two levels are what a student distilled for N/2 steps has learnt; the sampler evaluates
it at every level of the N-step grid.
"""
import numpy as np
import torch

from tract_repro.common.errors import ConfigError
from tract_repro.diffusion.ddim import ddim_step


def renoise(z_k, lam_k, lam_s, alpha_sigma, xi):
    """z_s = (α_s/α_k)·z_k + σ_{s|k}·ξ with σ²_{s|k} = (1 − e^{λ_s − λ_k})·σ_s²: forward from λ_k to a noisier λ_s."""
    alpha_k, _ = alpha_sigma(lam_k)
    alpha_s, sigma_s = alpha_sigma(lam_s)
    var = (1.0 - torch.exp(lam_s - lam_k)).view(alpha_s.shape) * sigma_s ** 2
    return (alpha_s / alpha_k) * z_k + var.clamp(min=0).sqrt() * xi


def ddim_jump(denoiser, clip=True):
    """The deterministic jump λ_a → λ_b of a denoiser: one DDIM step (x̂ clipped to [−1, 1])."""
    def jump(x, lam_a, lam_b, alpha_sigma, cond):
        alpha_a, sigma_a = alpha_sigma(lam_a)
        alpha_b, sigma_b = alpha_sigma(lam_b)
        return ddim_step(x, denoiser(x, lam_a, cond), alpha_a, sigma_a, alpha_b, sigma_b, clip=clip)
    return jump


STREAM = 0x5EED5  # keys the re-noising draws apart from every other per-seed draw


def seeded_noise(seeds, shape):
    """ξ for step i of sample j from seed j alone: numpy's PCG64 keyed by SeedSequence((seed j, STREAM, i)),
    independent of the batch, of the other steps and of the initial noise.  (Not torch's CPU generator offset
    by multiples of 2^32: it keeps only a seed's low 32 bits, so such offsets replay the initial noise.)"""
    def noise(i, like):
        draws = [np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(s), STREAM, int(i)]))).standard_normal(shape)
                 for s in seeds]
        return torch.from_numpy(np.stack(draws)).to(like.device, like.dtype)
    return noise


@torch.no_grad()
def stochastic(denoiser, x, logsnrs, alpha_sigma, cond=None, noise=None, jump=None, clip=True):
    """Meng et al.'s N-step stochastic sampler down λs (N + 1 levels): jump 2 levels, re-noise 1; the last step
    deterministic.  ``noise(i, x)`` gives step i's ξ (see :func:`seeded_noise`); ``jump`` defaults to DDIM (x̂
    clipped to [−1, 1] if ``clip``)."""
    if noise is None:
        raise ConfigError("the stochastic sampler needs per-sample noise: give it seeds")
    jump = jump or ddim_jump(denoiser, clip)
    n, steps = x.shape[0], len(logsnrs) - 1
    lam = [value.expand(n) for value in logsnrs]
    for i in range(steps - 1):
        z_k = jump(x, lam[i], lam[i + 2], alpha_sigma, cond)
        x = renoise(z_k, lam[i + 2], lam[i + 1], alpha_sigma, noise(i, x))
    return jump(x, lam[steps - 1], lam[steps], alpha_sigma, cond)
