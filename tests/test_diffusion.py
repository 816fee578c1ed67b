"""Exact maths of the schedule, parameterisations, DDIM step, inversion and weightings."""
import math

import pytest
import torch

from tract_repro.diffusion import parameterisations as P
from tract_repro.diffusion import weighting as W
from tract_repro.diffusion.ddim import ddim_step, invert_ddim
from tract_repro.diffusion.grid import TimeGrid
from tract_repro.diffusion.schedules import CosineSchedule, ve_alpha_sigma

T = 1024


@pytest.fixture
def grid():
    return TimeGrid(CosineSchedule(), T)


def sample(shape=(64, 1, 8, 8), seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(shape, generator=g, dtype=torch.float64) * 2 - 1
    eps = torch.randn(shape, generator=g, dtype=torch.float64)
    return x, eps


def test_cosine_schedule_endpoints_and_monotonicity(grid):
    assert grid.logsnr[0].item() == pytest.approx(20.0, abs=1e-9)
    assert grid.logsnr[-1].item() == pytest.approx(-20.0, abs=1e-9)
    assert grid.logsnr[512].item() == pytest.approx(0.0, abs=1e-3)
    assert torch.all(grid.logsnr[1:] < grid.logsnr[:-1])
    torch.testing.assert_close(grid.alpha**2 + grid.sigma**2, torch.ones(T + 1, dtype=torch.float64), rtol=0, atol=1e-15)
    # λ = log(α²/σ²) holds on the grid
    torch.testing.assert_close(torch.log(grid.alpha**2 / grid.sigma**2), grid.logsnr, rtol=0, atol=1e-9)


def test_cosine_schedule_closed_form():
    """With λ range ±20 the schedule is α ≈ cos(π/2·u) away from the ends (Nichol & Dhariwal's cosine)."""
    u = torch.linspace(0.05, 0.95, 19, dtype=torch.float64)
    alpha, _ = CosineSchedule().alpha_sigma(CosineSchedule().logsnr(u))
    torch.testing.assert_close(alpha, torch.cos(math.pi / 2 * u), rtol=0, atol=1e-4)


@pytest.mark.parametrize("name", ["x", "eps", "v", "both"])
def test_parameterisations_recover_x_from_true_heads(grid, name):
    x, eps = sample()
    idx = torch.randint(1, T + 1, (x.shape[0],), generator=torch.Generator().manual_seed(1))
    _, alpha, sigma = grid.at(idx)
    x_t = alpha * x + sigma * eps
    heads = {"x": x, "eps": eps, "v": P.v_target(x, eps, alpha, sigma), "both": torch.cat([x, eps], 1)}
    x_hat = P.get(name)(x_t, heads[name], alpha, sigma)
    torch.testing.assert_close(x_hat, x, rtol=0, atol=1e-7 if name == "eps" else 1e-12)


def test_unknown_parameterisation_and_weighting_errors():
    with pytest.raises(ValueError, match="choose one of"):
        P.get("score")
    with pytest.raises(ValueError, match="choose one of"):
        W.get("min-snr")


def test_ddim_step_with_true_x_follows_the_forward_process(grid):
    x, eps = sample()
    t, s = torch.full((64,), 700), torch.full((64,), 300)
    _, at, st = grid.at(t)
    _, as_, ss = grid.at(s)
    x_s = ddim_step(at * x + st * eps, x, at, st, as_, ss)
    torch.testing.assert_close(x_s, as_ * x + ss * eps, rtol=0, atol=1e-12)


def test_ddim_clip_only_changes_out_of_range_predictions(grid):
    x, eps = sample()
    _, at, st = grid.at(torch.full((64,), 500))
    _, as_, ss = grid.at(torch.full((64,), 400))
    x_t = at * x + st * eps
    torch.testing.assert_close(ddim_step(x_t, x, at, st, as_, ss, clip=True), ddim_step(x_t, x, at, st, as_, ss))
    assert not torch.allclose(ddim_step(x_t, 3 * x, at, st, as_, ss, clip=True), ddim_step(x_t, 3 * x, at, st, as_, ss))


@pytest.mark.parametrize("t,s", [(1, 0), (2, 1), (32, 0), (1024, 0), (1024, 992), (1000, 1), (33, 32)])
def test_inversion_round_trips(grid, t, s):
    """invert(step(x̂)) = x̂ and step(invert(x_s)) = x_s, to ~1e-6 relative even at t = 1/T."""
    x, eps = sample(seed=t)
    n = x.shape[0]
    _, at, st = grid.at(torch.full((n,), t))
    _, as_, ss = grid.at(torch.full((n,), s))
    x_t = at * x + st * eps
    x_hat = torch.tanh(x + 0.3 * eps)  # any prediction
    x_s = ddim_step(x_t, x_hat, at, st, as_, ss)
    back = invert_ddim(x_t, x_s, at, st, as_, ss)
    assert ((back - x_hat).abs().max() / x_hat.abs().max()).item() < 1e-6
    x_target = torch.randn(x.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    again = ddim_step(x_t, invert_ddim(x_t, x_target, at, st, as_, ss), at, st, as_, ss)
    assert ((again - x_target).abs().max() / x_target.abs().max()).item() < 1e-6


def test_inversion_is_ddim_ve_when_alpha_is_one():
    """With α = 1 the same formulas are TRACT-EDM's DDIM-VE step and inversion (method-spec §6)."""
    sig = torch.tensor([80.0, 2.5, 0.002, 0.0], dtype=torch.float64)
    alpha, sigma = ve_alpha_sigma(-2 * torch.log(sig))
    x_b, d = torch.tensor(1.3, dtype=torch.float64), torch.tensor(0.4, dtype=torch.float64)
    x_c = ddim_step(x_b, d, alpha[1], sigma[1], alpha[2], sigma[2])
    assert x_c.item() == pytest.approx((d + (0.002 / 2.5) * (x_b - d)).item(), rel=1e-12)
    x_a = torch.tensor(-0.7, dtype=torch.float64)
    assert invert_ddim(x_a, x_c, alpha[0], sigma[0], alpha[2], sigma[2]).item() == pytest.approx(
        ((80.0 * x_c - 0.002 * x_a) / (80.0 - 0.002)).item(), rel=1e-12)
    assert sigma[3].item() == 0.0 and alpha[3].item() == 1.0


def test_weightings_are_the_eps_and_v_losses(grid):
    x, eps = sample()
    idx = torch.randint(1, T + 1, (64,), generator=torch.Generator().manual_seed(3))
    lam, alpha, sigma = grid.at(idx)
    x_t = alpha * x + sigma * eps
    x_hat = x + 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    x_err = (x_hat - x).square().flatten(1).mean(1)
    eps_hat = (x_t - alpha * x_hat) / sigma
    eps_err = (eps_hat - eps).square().flatten(1).mean(1)
    v_err = (P.v_target(x_hat, eps_hat, alpha, sigma) - P.v_target(x, eps, alpha, sigma)).square().flatten(1).mean(1)
    torch.testing.assert_close(W.snr(lam) * x_err, eps_err, rtol=1e-9, atol=0)
    torch.testing.assert_close(W.snr_plus_one(lam) * x_err, v_err, rtol=1e-9, atol=0)
    torch.testing.assert_close(W.truncated_snr(lam) * x_err, torch.maximum(x_err, eps_err), rtol=1e-9, atol=0)
