"""EDM's Heun (RK2) step on VE grids: the TRACT-EDM teacher step and EDM's deterministic sampler.

The probability-flow ODE of a VE process is dx/dσ = (x − D(x, σ))/σ (method-spec §6).  Heun's
step from σ_a to σ_b is second order; to σ_b = 0 the Euler step is used instead, and that
Euler step lands exactly on the denoiser's output x + (0 − σ_a)·(x − D)/σ_a = D, which we
return as D itself (bit-exact, no round-off).  Both functions talk in λ like every other step
and sampler: σ = exp(−λ/2), α = 1.
"""
import torch

from tract_repro.networks.conditioning import as_cond

from tract_repro.common.errors import ConfigError


def _check_ve(grid):
    process = getattr(getattr(grid, "schedule", None), "process", None)
    if process != "ve":
        raise ConfigError(f"the Heun teacher step needs a VE grid (alpha = 1, e.g. EDMSchedule), got process {process!r}")


def _euler_heun(denoiser, x, sigma_a, sigma_b, logsnr_a, logsnr_b, cond):
    """One EDM step σ_a → σ_b per sample: Heun where σ_b > 0, Euler (= D(x, σ_a)) where σ_b = 0.

    σ_a, σ_b broadcast against x (B, 1, …); λ_a, λ_b have shape (B,).  Returns (x_b, D(x, σ_a)).
    """
    d_a = denoiser(x, logsnr_a, cond)
    d0 = (x - d_a) / sigma_a
    x_euler = x + (sigma_b - sigma_a) * d0
    heun = sigma_b.reshape(-1) > 0
    x_b = torch.where(sigma_b > 0, x_euler, d_a)  # Euler to σ = 0 is D(x, σ_a), written exactly
    if heun.any():
        sel = slice(None) if heun.all() else heun
        xe, sb = x_euler[sel], sigma_b[sel]
        d1 = (xe - denoiser(xe, logsnr_b[sel], as_cond(cond)[sel])) / sb
        x_b[sel] = x[sel] + (sb - sigma_a[sel]) * (0.5 * (d0[sel] + d1))
    return x_b, d_a


@torch.no_grad()
def heun_teacher_step(denoiser, x_t, t, s, grid, cond=None, clip=True):
    """x_s by one EDM Heun step σ_t → σ_s (Euler when σ_s = 0), and D(x_t, λ_t) (method-spec §6).

    d₀ = (x − D(x, σ_t))/σ_t, x' = x + (σ_s − σ_t)·d₀; where σ_s > 0, d₁ = (x' − D(x', σ_s))/σ_s and
    x_s = x + (σ_s − σ_t)·(d₀ + d₁)/2; where σ_s = 0, x_s = x' = D(x_t, σ_t) exactly.  The second
    denoiser call runs only on the samples with σ_s > 0.  ``clip`` is accepted for the shared
    teacher-step signature and ignored: EDM's Heun teacher steps are never clipped (only the
    DDIM-VE self-teacher step of TRACT-EDM clips x̂).
    """
    del clip
    _check_ve(grid)
    logsnr_t, _, sigma_t = grid.at(t)
    logsnr_s, _, sigma_s = grid.at(s)
    return _euler_heun(denoiser, x_t, sigma_t, sigma_s, logsnr_t, logsnr_s, cond)


@torch.no_grad()
def heun_sampler(denoiser, x, logsnrs, alpha_sigma, cond=None):
    """EDM's deterministic Heun sampler (Algorithm 2, S_churn = 0) from λs[0] down the sequence λs.

    Heun on every step with σ_next > 0 and Euler on a step to σ = 0, so N steps over the
    reversed EDM grid (ending at σ = 0) cost 2N − 1 evaluations: 35 for EDM's 18-step sampler.
    ``alpha_sigma`` must be a VE map (α = 1).
    """
    n = x.shape[0]
    view = (-1,) + (1,) * (x.ndim - 1)
    logsnrs = torch.as_tensor(logsnrs, dtype=torch.float64)
    for lam_a, lam_b in zip(logsnrs[:-1], logsnrs[1:]):
        lam_a, lam_b = lam_a.expand(n), lam_b.expand(n)
        alpha_a, sigma_a = alpha_sigma(lam_a)
        alpha_b, sigma_b = alpha_sigma(lam_b)
        if not (torch.all(alpha_a == 1) and torch.all(alpha_b == 1)):
            raise ConfigError("heun_sampler needs a VE process (alpha = 1), e.g. an EDMSchedule grid")
        x, _ = _euler_heun(denoiser, x, sigma_a.reshape(view), sigma_b.reshape(view), lam_a, lam_b, cond)
    return x
