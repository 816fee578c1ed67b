"""The sampler registry: a name → its sampler function, its λ sequence and its network-call count.

Every sampler has one signature, ``sample(denoiser, x, logsnrs, alpha_sigma, cond)`` (k-diffusion
style): it starts from x at λs[0] and walks down the sequence.  Evaluation, the command lines, gin
and the tables read samplers from here; adding a sampler is one entry of :data:`SAMPLERS`.
"""
from dataclasses import dataclass
from typing import Callable

import torch

from tract_repro.common.errors import ConfigError
from tract_repro.sampling.heun import heun_sampler
from tract_repro.sampling.samplers import ddim, grid_logsnrs
from tract_repro.sampling.stochastic import seeded_noise, stochastic


@dataclass(frozen=True)
class Sampler:
    name: str
    sample: Callable          # sample(denoiser, x, logsnrs, alpha_sigma, cond) → x at the last λ
    logsnrs: Callable         # logsnrs(grid, K) → the K + 1 noise levels of a K-step sampler, noisiest first
    network_calls: Callable   # network_calls(K) → NFE of K steps
    description: str          # how results name it
    seeded: bool = False      # draws noise while it samples: sample(..., noise=seeded_noise(seeds, shape))
    clips: bool = False       # clips x̂ to [−1, 1] unless told sample(..., clip=False) (a run on unbounded data)


def _edm_logsnrs(grid, steps):
    """λ of EDM's own K-step ρ-grid, noisiest first, ending at σ = 0 (method-spec §6)."""
    return grid.schedule.grid(steps).flip(0)


SAMPLERS = {
    "ddim": Sampler("ddim", ddim, grid_logsnrs, lambda k: k, "ddim (clipped x̂)", clips=True),
    "heun": Sampler("heun", heun_sampler, _edm_logsnrs, lambda k: 2 * k - 1, "heun (EDM, deterministic)"),
    "stochastic": Sampler("stochastic", stochastic, grid_logsnrs, lambda k: k,
                          "stochastic (Meng et al.: DDIM jumps of 2/N re-noised by 1/N, the last step deterministic)",
                          seeded=True, clips=True),
}


def get(name):
    """The sampler called ``name``, with a one-line error naming the choices."""
    try:
        return SAMPLERS[name]
    except KeyError:
        raise ConfigError(f"unknown sampler {name!r}: choose one of {', '.join(SAMPLERS)}") from None


def network_calls(name, steps):
    """NFE of ``steps`` steps of the sampler ``name``: K for DDIM, 2K − 1 for Heun (Euler on the last)."""
    return get(name).network_calls(int(steps))


@torch.no_grad()
def sample(name, denoiser, grid, steps, noise, cond=None, seeds=None, clip=True):
    """``steps`` steps of the sampler ``name`` on ``grid`` from standard noise z (x at the first λ is σ·z);
    a sampler that draws noise as it goes draws it from ``seeds``, one per sample.  ``clip = False``: x̂ is not
    clipped to [−1, 1], for a run whose data are unbounded (latents: :attr:`FinishedRun.bounded`)."""
    sampler = get(name)
    logsnrs = sampler.logsnrs(grid, steps).to(noise.device)
    _, sigma = grid.alpha_sigma(logsnrs[:1])
    extra = {}
    if sampler.seeded:
        if seeds is None:
            raise ConfigError(f"the {name} sampler draws noise per sample: give it the samples' seeds")
        extra["noise"] = seeded_noise(seeds, tuple(noise.shape[1:]))
    if sampler.clips:
        extra["clip"] = bool(clip)
    return sampler.sample(denoiser, sigma * noise, logsnrs, grid.alpha_sigma, cond, **extra)
