"""EDM VE-teacher maths: the ρ grid, preconditioning, Heun steps and the EDM denoiser (method-spec §6)."""
import math

import pytest
import torch
from torch import nn

from tract_repro.diffusion import edm
from tract_repro.diffusion import weighting as W
from tract_repro.sampling import registry
from tract_repro.diffusion.ddim import ddim_step, invert_ddim
from tract_repro.diffusion.edm import EDMSchedule
from tract_repro.diffusion.grid import TimeGrid
from tract_repro.diffusion.schedules import ve_alpha_sigma
from tract_repro.sampling.heun import heun_sampler, heun_teacher_step
from tract_repro.networks.edm_denoiser import EDMDenoiser
from tract_repro.sampling.samplers import grid_logsnrs

SD = 0.5
# EDM's 18-step sampler grid t_0..t_18 (edm-notes §6.1)
EDM_18 = [80, 57.586, 40.786, 28.375, 19.353, 12.910, 8.401, 5.315, 3.257, 1.923, 1.088, 0.585, 0.296,
          0.140, 0.060, 0.023, 0.0075, 0.002, 0]


def f64(values):
    return torch.tensor(values, dtype=torch.float64)


class FixedVE:
    """A VE 'schedule' whose grid is the given ascending σ list (σ_0 = 0)."""

    process = "ve"

    def __init__(self, sigmas):
        self.sigmas = f64(sigmas)

    def grid(self, T):
        assert T == len(self.sigmas) - 1
        return -2.0 * torch.log(self.sigmas)

    def alpha_sigma(self, logsnr):
        return ve_alpha_sigma(logsnr)


def gaussian_denoiser(s, calls=None):
    """The ideal denoiser for data x ~ N(0, s²): D(x, σ) = s²/(s² + σ²)·x, as a function of λ."""

    def denoise(x, logsnr, labels=None):
        if calls is not None:
            calls.append(x.shape[0])
        sigma = torch.exp(-0.5 * logsnr).view(-1, *([1] * (x.ndim - 1)))
        return s * s / (s * s + sigma * sigma) * x

    return denoise


def flow(x, s, sigma_a, sigma_b):
    """Exact probability-flow ODE solution for N(0, s²) data: x·√((s² + σ_b²)/(s² + σ_a²))."""
    return x * math.sqrt((s * s + sigma_b ** 2) / (s * s + sigma_a ** 2))


# ------------------------------------------------------------------------------------------ grid


def test_edm_grid_values_and_timegrid():
    grid = TimeGrid(EDMSchedule(), 40)
    assert grid.sigma[0].item() == 0.0 and grid.logsnr[0].item() == math.inf
    assert torch.all(grid.alpha == 1)
    sig = grid.sigma.flatten()
    assert sig.dtype == torch.float64 and sig.shape == (41,)
    assert torch.all(sig[1:] > sig[:-1])
    assert sig[1].item() == pytest.approx(0.002, rel=1e-12) and sig[-1].item() == pytest.approx(80.0, rel=1e-12)
    # σ_i = (σ_min^{1/ρ} + (i−1)/(T−1)·(σ_max^{1/ρ} − σ_min^{1/ρ}))^ρ
    lo, hi = 0.002 ** (1 / 7), 80.0 ** (1 / 7)
    for i in (1, 2, 17, 40):
        assert sig[i].item() == pytest.approx((lo + (i - 1) / 39 * (hi - lo)) ** 7, rel=1e-12)
    assert sig[2].item() == pytest.approx(0.00368, abs=1e-5)
    # the grid is λ = −2 ln σ, and logsnr(u) walks the same curve
    sched = EDMSchedule()
    assert torch.allclose(grid.logsnr[1:], sched.logsnr(torch.arange(40, dtype=torch.float64) / 39), rtol=0, atol=1e-12)
    assert sched.sigma(0.0).item() == pytest.approx(0.002) and sched.sigma(1.0).item() == pytest.approx(80.0)


def test_edm_18_step_sampler_grid():
    grid = TimeGrid(EDMSchedule(), 18)
    reversed_sigmas = grid.sigma.flatten().flip(0)
    assert torch.allclose(reversed_sigmas, f64(EDM_18), rtol=0, atol=1e-3)
    logsnrs = grid_logsnrs(grid, 18)
    assert torch.equal(logsnrs, grid.logsnr.flip(0))


# ---------------------------------------------------------------------------- preconditioning


def test_preconditioning_identities():
    assert edm.c_skip(0.0) == 1.0 and edm.c_out(0.0) == 0.0
    sigma = f64([0.002, 0.1, 0.5, 1.0, 7.0, 80.0])
    assert torch.allclose(edm.c_in(sigma) * torch.sqrt(sigma ** 2 + SD ** 2), torch.ones_like(sigma), rtol=0, atol=1e-15)
    # c_out² = σ_d²·(1 − c_skip): the effective training target has unit variance
    assert torch.allclose(edm.c_out(sigma) ** 2, SD ** 2 * (1 - edm.c_skip(sigma)), rtol=1e-10, atol=0)
    assert torch.allclose(edm.c_noise(sigma), torch.log(sigma) / 4, rtol=0, atol=0)
    # the optimal F for a point mass at 0 (D* = 0) is F* = −c_skip/(c_out·c_in)·x_in = −(σ_d/σ)·x_in
    x = torch.randn(6, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    s = sigma.view(-1, 1)
    f_star = -(SD / s) * (edm.c_in(s) * x)
    d = edm.c_skip(s) * x + edm.c_out(s) * f_star
    assert d.abs().max().item() < 1e-14


def test_edm_weight_is_lambda_sigma():
    sigma = f64([0.002, 0.3, 1.0, 80.0])
    logsnr = -2 * torch.log(sigma)
    expected = (sigma ** 2 + SD ** 2) / (sigma * SD) ** 2
    assert torch.allclose(W.get("edm")(logsnr), expected, rtol=1e-12, atol=0)
    assert torch.allclose(W.get("edm")(logsnr), 1 / edm.c_out(sigma) ** 2, rtol=1e-12, atol=0)


def test_lognormal_logsnr_moments():
    logsnr = edm.lognormal_logsnr(20000, torch.Generator().manual_seed(123))
    assert logsnr.dtype == torch.float64 and logsnr.shape == (20000,)
    log_sigma = -0.5 * logsnr
    assert abs(log_sigma.mean().item() - (-1.2)) < 0.03
    assert abs(log_sigma.std().item() - 1.2) < 0.03


# ------------------------------------------------------------------------------ DDIM-VE


def test_ddim_ve_step_and_inversion_round_trip():
    g = torch.Generator().manual_seed(1)
    x_a = torch.randn(4, 1, 2, 2, generator=g, dtype=torch.float64) * 3
    x_hat = torch.randn(4, 1, 2, 2, generator=g, dtype=torch.float64) * 0.5
    one = torch.ones(4, 1, 1, 1, dtype=torch.float64)
    sigma_a = f64([80.0, 5.0, 0.3, 0.0075]).view(-1, 1, 1, 1)
    sigma_c = f64([40.786, 0.0, 0.14, 0.002]).view(-1, 1, 1, 1)
    x_c = ddim_step(x_a, x_hat, one, sigma_a, one, sigma_c)
    # DDIM-VE: x_c = x̂ + (σ_c/σ_a)·(x_a − x̂)
    assert torch.allclose(x_c, x_hat + sigma_c / sigma_a * (x_a - x_hat), rtol=1e-13, atol=1e-13)
    x_tilde = invert_ddim(x_a, x_c, one, sigma_a, one, sigma_c)
    assert torch.allclose(x_tilde, x_hat, rtol=0, atol=1e-12)
    assert torch.allclose(x_tilde, (sigma_a * x_c - sigma_c * x_a) / (sigma_a - sigma_c), rtol=1e-13, atol=1e-13)


# --------------------------------------------------------------------------------- Heun


def heun_error(s, sigma_a, h, x):
    grid = TimeGrid(FixedVE([0.0, sigma_a - h, sigma_a]), 2)
    t, s_idx = torch.full((x.shape[0],), 2), torch.full((x.shape[0],), 1)
    x_b, _ = heun_teacher_step(gaussian_denoiser(s), x, t, s_idx, grid)
    return (x_b - flow(x, s, sigma_a, sigma_a - h)).abs().max().item()


def test_heun_step_is_second_order_and_beats_euler():
    s, sigma_a = 0.5, 1.0
    x = torch.linspace(-3, 3, 8, dtype=torch.float64).view(8, 1, 1, 1)
    e1, e2 = heun_error(s, sigma_a, 0.2, x), heun_error(s, sigma_a, 0.1, x)
    assert e1 / e2 > 6  # local error ∝ h³: halving h divides it by ~8
    # Euler's local error is ∝ h² and much larger
    denoise = gaussian_denoiser(s)
    lam = torch.full((8,), -2 * math.log(sigma_a), dtype=torch.float64)
    euler = x + (-0.1) * (x - denoise(x, lam)) / sigma_a
    e_euler = (euler - flow(x, s, sigma_a, sigma_a - 0.1)).abs().max().item()
    assert e2 < e_euler / 5


def test_heun_step_mixed_batch_and_euler_to_zero_is_exact():
    grid = TimeGrid(EDMSchedule(), 40)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(5, 2, 3, 3, generator=g, dtype=torch.float64) * 10
    t = torch.tensor([1, 7, 1, 40, 3])
    s = torch.tensor([0, 6, 0, 39, 0])
    calls = []
    denoise = gaussian_denoiser(0.5, calls)
    x_s, x_hat = heun_teacher_step(denoise, x, t, s, grid, clip=True)
    assert calls == [5, 2]  # the second evaluation runs only where σ_s > 0
    lam_t, _, _ = grid.at(t)
    d_t = denoise(x, lam_t)
    assert torch.equal(x_hat, d_t)
    zero = s == 0
    assert torch.equal(x_s[zero], d_t[zero])  # Euler to σ = 0 returns D exactly
    # the Heun rows equal a hand-written Heun step
    sa, sb = grid.sigma[t].view(-1, 1, 1, 1), grid.sigma[s].view(-1, 1, 1, 1)
    d0 = (x - d_t) / sa
    xe = x + (sb - sa) * d0
    d1 = (xe - denoise(xe, grid.logsnr[s])) / sb
    heun = x + (sb - sa) * (d0 + d1) / 2
    assert torch.allclose(x_s[~zero], heun[~zero], rtol=1e-14, atol=1e-14)
    # clip is ignored: D values beyond [−1, 1] go through unclipped
    assert x_s[zero].abs().max() > 1


def test_tract_edm_boundary_target_is_teacher_d():
    """A teacher step 1 → 0 is D(x, σ_1); the DDIM-VE inversion t → 0 then returns it as the target."""
    grid = TimeGrid(EDMSchedule(), 40)
    x = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    ones, zeros = torch.ones(3, dtype=torch.long), torch.zeros(3, dtype=torch.long)
    denoise = gaussian_denoiser(0.5)
    x_0, x_hat = heun_teacher_step(denoise, x, ones, zeros, grid)
    lam_1, alpha_1, sigma_1 = grid.at(ones)
    assert torch.equal(x_0, denoise(x, lam_1)) and torch.equal(x_0, x_hat)
    _, alpha_0, sigma_0 = grid.at(zeros)
    target = invert_ddim(x, x_0, alpha_1, sigma_1, alpha_0, sigma_0)
    assert torch.allclose(target, x_0, rtol=1e-15, atol=1e-15)


def test_heun_teacher_step_refuses_vp_grid():
    from tract_repro.diffusion.schedules import CosineSchedule

    grid = TimeGrid(CosineSchedule(), 8)
    with pytest.raises(ValueError, match="VE grid"):
        heun_teacher_step(gaussian_denoiser(0.5), torch.zeros(1, 1, 1, 1, dtype=torch.float64),
                          torch.tensor([2]), torch.tensor([1]), grid)


def test_heun_sampler_18_steps_35_nfe_converges_to_flow():
    """EDM's 18-step sampler costs 35 NFE; on N(0, s²) data its error shrinks ~4× per doubling of N."""
    s = 0.5
    z = torch.randn(6, 1, 2, 2, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    exact = flow(80.0 * z, s, 80.0, 0.0)
    errors = []
    for steps in (18, 36):
        grid = TimeGrid(EDMSchedule(), steps)
        calls = []
        x = heun_sampler(gaussian_denoiser(s, calls), 80.0 * z, grid_logsnrs(grid, steps), grid.alpha_sigma)
        assert len(calls) == registry.network_calls('heun', steps) == 2 * steps - 1
        errors.append(((x - exact) / exact).abs().max().item())
    assert errors[0] < 0.1
    assert errors[0] / errors[1] > 3.5
    assert len(calls) == 71 and registry.network_calls('heun', 18) == 35


def test_heun_sampler_last_step_is_d():
    """The last step to σ = 0 is Euler, i.e. exactly D(x, σ_min)."""
    lam = f64([-2 * math.log(0.002), math.inf])
    x = torch.randn(2, 1, 2, 2, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    denoise = gaussian_denoiser(0.5)
    out = heun_sampler(denoise, x, lam, ve_alpha_sigma)
    assert torch.equal(out, denoise(x, lam[0].expand(2)))


# ----------------------------------------------------------------------------- denoiser


class StandIn(nn.Module):
    """An EDMPrecond-like wrapper: ``model(x, noise_labels, class_labels)`` records its inputs."""

    class Model(nn.Module):
        def __init__(self, num_classes):
            super().__init__()
            self.weight = nn.Parameter(torch.tensor(0.75))
            self.label_proj = nn.Parameter(torch.arange(max(num_classes, 1), dtype=torch.float32))
            self.seen = {}

        def forward(self, x, noise_labels, class_labels):
            self.seen = dict(x=x, noise=noise_labels, labels=class_labels)
            out = self.weight * x + noise_labels.view(-1, 1, 1, 1)
            if class_labels is not None:
                out = out + (class_labels @ self.label_proj).view(-1, 1, 1, 1)
            return out

    def __init__(self, num_classes=None):
        super().__init__()
        self.model = self.Model(num_classes or 1)
        if num_classes is not None:
            self.num_classes = num_classes


def test_edm_denoiser_formula_dtype_and_labels():
    net = StandIn(num_classes=10)
    den = EDMDenoiser(net)
    assert den.conditional
    assert list(den.state_dict()) == ["net.model.weight", "net.model.label_proj"]
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64) * 5
    sigma = f64([0.002, 1.3, 80.0])
    labels = torch.tensor([0, 3, 9])
    with torch.no_grad():
        d = den(x, -2 * torch.log(sigma), labels)
    seen = net.model.seen
    assert d.dtype == torch.float64
    assert seen["x"].dtype == torch.float32 and seen["noise"].dtype == torch.float32
    assert torch.equal(seen["labels"], torch.nn.functional.one_hot(labels, 10).float())
    s = sigma.view(-1, 1, 1, 1)
    assert torch.allclose(seen["x"].double(), edm.c_in(s) * x, rtol=1e-6, atol=0)
    assert torch.allclose(seen["noise"].double(), torch.log(sigma) / 4, rtol=1e-6, atol=1e-7)
    with torch.no_grad():
        f = net.model(seen["x"], seen["noise"], seen["labels"]).double()
    assert torch.equal(d, edm.c_skip(s) * x + edm.c_out(s) * f)


def test_edm_denoiser_unconditional_and_point_mass():
    class PointMass(nn.Module):
        def forward(self, x, noise_labels, class_labels):
            assert class_labels is None
            return -SD * torch.exp(-4 * noise_labels).view(-1, 1, 1, 1) * x  # F* = −(σ_d/σ)·x_in

    net = nn.Module()
    net.model = PointMass()
    den = EDMDenoiser(net)
    assert not den.conditional
    x = torch.randn(4, 3, 2, 2, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    sigma = f64([0.01, 0.5, 2.0, 80.0])
    d = den(x * sigma.view(-1, 1, 1, 1), -2 * torch.log(sigma), torch.tensor([1, 2, 3, 4]))
    assert d.abs().max().item() < 1e-5 * 80
    # EDM's label_dim = 0 reads as unconditional too
    net.label_dim = 0
    assert not EDMDenoiser(net).conditional
