"""Meng et al.'s stochastic sampler on Gaussian data, where the exact ODE jump and the exact re-noising are
known in closed form: with exact jumps the sampler leaves every marginal as the forward process has it."""
import math

import pytest
import torch

from tract_repro.diffusion.grid import TimeGrid
from tract_repro.diffusion.schedules import CosineSchedule
from tract_repro.sampling.samplers import grid_logsnrs
from tract_repro.sampling.stochastic import ddim_jump, renoise, stochastic

M, V = 0.3, 0.04  # data x ~ N(M, V) per pixel
N = 200_000


def marginal(grid, lam):
    """Mean and variance of x_λ = α·x + σ·ε for x ~ N(M, V)."""
    alpha, sigma = grid.alpha_sigma(lam.reshape(1))
    return (alpha * M).item(), (alpha ** 2 * V + sigma ** 2).item()


def exact_jump(grid):
    """The probability-flow ODE's map from λ_a to λ_b for Gaussian data: x_b = m_b + √(V_b/V_a)·(x_a − m_a)."""
    def jump(x, lam_a, lam_b, alpha_sigma, cond):
        (m_a, v_a), (m_b, v_b) = marginal(grid, lam_a[0]), marginal(grid, lam_b[0])
        return m_b + math.sqrt(v_b / v_a) * (x - m_a)
    return jump


def gaussian_noise(seed):
    g = torch.Generator().manual_seed(seed)
    return lambda i, like: torch.randn(like.shape, generator=g, dtype=like.dtype)


@pytest.mark.parametrize("steps", [2, 4, 8])
def test_exact_jumps_and_renoising_keep_the_data_marginal(steps):
    grid = TimeGrid(CosineSchedule(), 64)
    logsnrs = grid_logsnrs(grid, steps)
    m0, v0 = marginal(grid, logsnrs[0])
    x = m0 + math.sqrt(v0) * torch.randn(N, 1, 1, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    out = stochastic(None, x, logsnrs, grid.alpha_sigma, noise=gaussian_noise(2), jump=exact_jump(grid))
    m_end, v_end = marginal(grid, logsnrs[-1])
    assert abs(out.mean().item() - m_end) < 4 * math.sqrt(v_end / N)
    assert abs(out.var().item() / v_end - 1) < 4 * math.sqrt(2 / N)


def test_renoising_moves_the_marginal_one_level_up_exactly():
    grid = TimeGrid(CosineSchedule(), 64)
    lam_k, lam_s = grid.logsnr[16].reshape(1), grid.logsnr[24].reshape(1)  # s noisier than k
    (m_k, v_k), (m_s, v_s) = marginal(grid, lam_k), marginal(grid, lam_s)
    z_k = m_k + math.sqrt(v_k) * torch.randn(N, 1, 1, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    lam = lambda value: value.expand(N)  # noqa: E731
    xi = torch.randn(N, 1, 1, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    z_s = renoise(z_k, lam(lam_k), lam(lam_s), grid.alpha_sigma, xi)
    assert abs(z_s.mean().item() - m_s) < 4 * math.sqrt(v_s / N)
    assert abs(z_s.var().item() / v_s - 1) < 4 * math.sqrt(2 / N)
    wrong = renoise(z_k, lam(lam_k), lam(lam_s), grid.alpha_sigma, 1.5 * xi)  # the check can fail
    assert abs(wrong.var().item() / v_s - 1) > 10 * math.sqrt(2 / N)


def test_a_ddim_jump_on_gaussian_data_is_not_exact():
    """The test above needs the exact jump: one DDIM step with the exact denoiser shrinks the variance."""
    grid = TimeGrid(CosineSchedule(), 64)

    def exact_denoiser(x, lam, cond=None):
        alpha, sigma = grid.alpha_sigma(lam)
        return M + alpha * V / (alpha ** 2 * V + sigma ** 2) * (x - alpha * M)

    logsnrs = grid_logsnrs(grid, 2)
    m0, v0 = marginal(grid, logsnrs[0])
    x = m0 + math.sqrt(v0) * torch.randn(N, 1, 1, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    lam = [value.expand(N) for value in logsnrs]
    out = ddim_jump(exact_denoiser, clip=False)(x, lam[0], lam[2], grid.alpha_sigma, None)
    assert out.var().item() < 0.9 * marginal(grid, logsnrs[2])[1]


def test_seeded_re_noising_is_independent_of_the_initial_noise_the_other_steps_and_the_batch():
    """ξ of step i of sample j comes from seed j alone and is uncorrelated with that sample's initial noise and
    with other steps' ξ (a seed offset by 2^40 in torch's 32-bit-seeded generator would replay the initial noise)."""
    from tract_repro.sampling.samplers import noise_from_seeds
    from tract_repro.sampling.stochastic import seeded_noise

    seeds, shape, like = range(400), (1, 8, 8), torch.zeros(1, dtype=torch.float64)
    initial = noise_from_seeds(seeds, shape).flatten()
    xi0, xi1 = seeded_noise(seeds, shape)(0, like).flatten(), seeded_noise(seeds, shape)(1, like).flatten()
    for a, b in ((initial, xi0), (initial, xi1), (xi0, xi1)):
        assert abs(torch.corrcoef(torch.stack([a, b]))[0, 1].item()) < 4 / math.sqrt(len(a))
    assert abs(xi0.mean().item()) < 4 / math.sqrt(len(xi0)) and abs(xi0.var().item() - 1) < 4 * math.sqrt(2 / len(xi0))
    alone = seeded_noise([7, 3], shape)(5, like)
    assert torch.equal(alone[1], seeded_noise(range(10), shape)(5, like)[3])  # sample 3's draw whatever the batch
