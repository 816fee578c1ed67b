"""A diffusers teacher's discrete β schedule in continuous time: ᾱ as diffusers computes it, the T-grid on the
trained timesteps that diffusers' trailing DDIM visits, the fractional timestep a network is fed, and both ends."""
import json
import math

import numpy as np
import pytest
import torch

from tract_repro.common.errors import ConfigError
from tract_repro.diffusion.ddim import ddim_step
from tract_repro.diffusion.grid import TimeGrid
from tract_repro.diffusion.schedules import DiscreteSchedule, diffusers_schedule, vp_alpha_sigma

SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
SCHEDULES = [SD, dict(beta_schedule="linear", beta_start=0.0001, beta_end=0.02),
             dict(beta_schedule="squaredcos_cap_v2", beta_start=0.0001, beta_end=0.02)]


def ddim_scheduler(**kw):
    from diffusers import DDIMScheduler

    return DDIMScheduler(num_train_timesteps=1000, **kw)


def reference_alphas_cumprod(beta_schedule, beta_start, beta_end, N=1000):
    """diffusers' β definitions recomputed in float64 with numpy, then ᾱ_n = ∏ (1 − β_m)."""
    if beta_schedule == "linear":
        betas = np.linspace(beta_start, beta_end, N)
    elif beta_schedule == "scaled_linear":
        betas = np.linspace(beta_start ** 0.5, beta_end ** 0.5, N) ** 2
    else:
        bar = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
        betas = np.array([min(1 - bar((n + 1) / N) / bar(n / N), 0.999) for n in range(N)])
    return np.cumprod(1 - betas)


@pytest.mark.parametrize("kw", SCHEDULES, ids=lambda kw: kw["beta_schedule"])
def test_every_trained_timestep_has_the_alpha_bar_of_diffusers(kw):
    ours = DiscreteSchedule(**kw)
    ref = reference_alphas_cumprod(**kw)
    np.testing.assert_allclose(ours.alphas_cumprod.numpy(), ref, rtol=1e-12, atol=0)
    # λ at τ = n is log ᾱ_n − log(1 − ᾱ_n)
    np.testing.assert_allclose(ours.table[1:].numpy(), np.log(ref) - np.log1p(-ref), rtol=1e-10, atol=0)
    scheduler = ddim_scheduler(**kw)  # diffusers' own tensors, computed in float32
    np.testing.assert_allclose(ours.betas.numpy(), scheduler.betas.double().numpy(), rtol=1e-6, atol=0)
    # float32 cumprod drifts along the 1000 factors: within 1e-6 of ours for the linear schedules, 2e-5 for the cosine
    rtol = 2e-5 if kw["beta_schedule"] == "squaredcos_cap_v2" else 1e-6
    np.testing.assert_allclose(ours.alphas_cumprod.numpy(), scheduler.alphas_cumprod.double().numpy(), rtol=rtol, atol=0)


@pytest.mark.parametrize("kw", SCHEDULES, ids=lambda kw: kw["beta_schedule"])
def test_logsnr_decreases_in_time_and_the_timestep_inverts_it(kw):
    s = DiscreteSchedule(**kw)
    u = torch.linspace(0, 1, 100_001, dtype=torch.float64)
    lam = s.logsnr(u)
    assert lam[0] == math.inf and bool((lam[1:] < lam[:-1]).all())
    torch.testing.assert_close(s.timestep(lam), 1000 * u - 1, rtol=0, atol=1e-9)
    for T in (1, 7, 64, 512, 1000):
        grid = s.grid(T)
        assert bool((grid[1:] < grid[:-1]).all())
        tau = torch.from_numpy(np.round(1000 * np.arange(T + 1) / T) - 1)
        assert torch.equal(s.timestep(grid), tau)  # exact at the trained timesteps
        torch.testing.assert_close(grid, s.logsnr((tau + 1) / 1000), rtol=0, atol=0)


@pytest.mark.parametrize("K", [1, 2, 4, 8, 16, 32, 64, 512])
def test_a_k_step_sampler_on_the_512_grid_visits_diffusers_trailing_ddim_timesteps(K):
    s, T = DiscreteSchedule(**SD), 512
    grid = s.grid(T)
    scheduler = ddim_scheduler(**SD, timestep_spacing="trailing")
    scheduler.set_timesteps(K)
    indices = torch.arange(T, 0, -(T // K))  # the noise levels the sampler calls the network at, noisiest first
    tau = s.timestep(grid[indices])
    assert tau.tolist() == scheduler.timesteps.double().tolist()
    np.testing.assert_allclose(torch.sigmoid(grid[indices]).numpy(),
                               scheduler.alphas_cumprod[scheduler.timesteps].double().numpy(), rtol=1e-6)


def test_a_grid_finer_than_the_trained_timesteps_is_refused_in_one_line():
    with pytest.raises(ConfigError) as info:
        DiscreteSchedule(**SD).grid(1024)
    message = str(info.value)
    assert "\n" not in message and "use T ≤ N, e.g. 512 as Meng et al." in message
    with pytest.raises(ConfigError, match="beta_schedule"):
        DiscreteSchedule(beta_schedule="sigmoid")


def test_the_clean_end_is_exact_and_the_noisy_end_is_not_pure_noise():
    s = DiscreteSchedule(**SD)
    alpha, sigma = vp_alpha_sigma(torch.tensor(math.inf, dtype=torch.float64))
    assert alpha.item() == 1.0 and sigma.item() == 0.0
    grid = TimeGrid(s, 512)
    assert grid.logsnr[0] == math.inf and grid.alpha[0] == 1 and grid.sigma[0] == 0
    g = torch.Generator().manual_seed(0)
    x_t, x_hat = (torch.randn(3, 4, 2, 2, dtype=torch.float64, generator=g) for _ in range(2))
    _, a_t, s_t = grid.at(torch.tensor([5, 100, 512]))
    _, a_0, s_0 = grid.at(torch.zeros(3, dtype=torch.long))
    assert torch.equal(ddim_step(x_t, x_hat, a_t, s_t, a_0, s_0), x_hat)
    assert torch.equal(ddim_step(x_t.float(), x_hat.float(), a_t, s_t, a_0, s_0), x_hat.float())  # float32 targets too
    # Stable Diffusion's last trained timestep: ᾱ_999 = 0.004660, λ = −5.364, σ = 0.99767
    assert round(s.alphas_cumprod[-1].item(), 6) == 0.004660 and round(grid.logsnr[-1].item(), 3) == -5.364
    assert round(grid.sigma[-1].item(), 5) == 0.99767
    assert s.timestep(torch.tensor([math.inf, -30.0], dtype=torch.float64)).tolist() == [-1.0, 999.0]


def test_the_schedule_of_a_diffusers_folder(tmp_path):
    from tests.tiny_diffusers import scheduler

    scheduler().save_pretrained(tmp_path / "model" / "scheduler")
    assert diffusers_schedule(tmp_path / "model") == DiscreteSchedule(**SD)
    assert diffusers_schedule(tmp_path / "model" / "scheduler" / "scheduler_config.json") == DiscreteSchedule(**SD)
    assert DiscreteSchedule(**SD) != DiscreteSchedule(**SCHEDULES[1])
    config = json.loads((tmp_path / "model" / "scheduler" / "scheduler_config.json").read_text())
    for change, words in ((dict(rescale_betas_zero_snr=True), "zero terminal SNR"),
                          (dict(trained_betas=[0.1] * 1000), "trained_betas"),
                          (dict(beta_schedule="sigmoid"), "beta_schedule")):
        (tmp_path / "bad.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(ConfigError, match=words) as info:
            DiscreteSchedule.from_diffusers_config(tmp_path / "bad.json")
        assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="fetch the model's scheduler/scheduler_config.json"):
        DiscreteSchedule.from_diffusers_config(tmp_path / "missing")
