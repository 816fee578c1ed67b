"""The sampler registry: each entry's network-call count is what its sampler really calls, and a
name that is not registered gets one line naming the choices."""
import pytest
import torch
from torch import nn

from tract_repro.common.errors import ConfigError
from tract_repro.diffusion.edm import EDMSchedule
from tract_repro.diffusion.grid import TimeGrid
from tract_repro.diffusion.schedules import CosineSchedule
from tract_repro.sampling import registry

GRIDS = {"ddim": TimeGrid(CosineSchedule(), 64), "heun": TimeGrid(EDMSchedule(), 40),
         "stochastic": TimeGrid(CosineSchedule(), 64)}


class Counting(nn.Module):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x, logsnr, labels=None):
        self.calls += 1
        return 0.5 * x


@pytest.mark.parametrize("name", sorted(registry.SAMPLERS))
@pytest.mark.parametrize("steps", [1, 2, 4, 8])
def test_network_calls_are_what_the_sampler_calls(name, steps):
    denoiser = Counting()
    noise = torch.randn(3, 1, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x = registry.sample(name, denoiser, GRIDS[name], steps, noise, seeds=range(3))
    assert x.shape == noise.shape and torch.isfinite(x).all()
    assert denoiser.calls == registry.network_calls(name, steps)


@pytest.mark.parametrize("name", sorted(registry.SAMPLERS))
def test_the_lambda_sequence_runs_from_the_noisiest_level_to_clean(name):
    logsnrs = registry.get(name).logsnrs(GRIDS[name], 4)
    clean = {"heun": float("inf")}.get(name, GRIDS["ddim"].logsnr[0])  # the grid's index 0; EDM's σ = 0
    assert len(logsnrs) == 5 and torch.all(logsnrs[1:] > logsnrs[:-1]) and logsnrs[-1] == clean


def test_an_unknown_sampler_is_one_line():
    with pytest.raises(ConfigError, match="unknown sampler 'euler': choose one of ddim, heun, stochastic"):
        registry.get("euler")


def test_a_seeded_sampler_draws_the_same_samples_whatever_the_batches():
    denoiser, grid = Counting(), GRIDS["stochastic"]
    noise = torch.randn(6, 1, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    whole = registry.sample("stochastic", denoiser, grid, 4, noise, seeds=range(10, 16))
    parts = [registry.sample("stochastic", denoiser, grid, 4, noise[a:b], seeds=range(10 + a, 10 + b)) for a, b in ((0, 2), (2, 6))]
    torch.testing.assert_close(torch.cat(parts), whole, rtol=0, atol=0)
    other = registry.sample("stochastic", denoiser, grid, 4, noise, seeds=range(20, 26))
    assert not torch.allclose(other, whole)  # the re-noising draws come from the seeds
    with pytest.raises(ConfigError, match="give it the samples' seeds"):
        registry.sample("stochastic", denoiser, grid, 4, noise)
