"""The deterministic DDIM step and its inversion (method-spec §2, §6).

With α = 1 these are also the DDIM-VE step and inversion of TRACT-EDM.

Images in float64 are computed as the formulas read.  Images in a lower precision (float32 targets on
a GPU, ``Device.precision``) are combined with per-sample coefficients computed in float64 from α and
σ (which stay float64) and only then rounded: the small differences such as α_t·σ_s − α_s·σ_t, which
the inversion divides by, are never formed in float32.
"""
import torch


def _coefficient(value, like):
    return value.to(like.dtype)


def ddim_step(x_t, x_hat, alpha_t, sigma_t, alpha_s, sigma_s, clip=False):
    """x_s = α_s·x̂ + σ_s·ε̂ with ε̂ = (x_t − α_t·x̂)/σ_t; x̂ clipped to [−1, 1] if ``clip``."""
    if clip:
        x_hat = x_hat.clamp(-1.0, 1.0)
    if x_t.dtype == torch.float64:
        eps_hat = (x_t - alpha_t * x_hat) / sigma_t
        return alpha_s * x_hat + sigma_s * eps_hat
    # x_s = (α_s − σ_s·α_t/σ_t)·x̂ + (σ_s/σ_t)·x_t, the coefficients in float64
    return _coefficient(alpha_s - sigma_s * alpha_t / sigma_t, x_t) * x_hat.to(x_t.dtype) \
        + _coefficient(sigma_s / sigma_t, x_t) * x_t


def invert_ddim(x_t, x_s, alpha_t, sigma_t, alpha_s, sigma_s):
    """x̃ = (σ_s·x_t − σ_t·x_s)/(α_t·σ_s − α_s·σ_t): the x̂ whose unclipped step t→s lands on x_s."""
    if x_t.dtype == torch.float64:
        return (sigma_s * x_t - sigma_t * x_s) / (alpha_t * sigma_s - alpha_s * sigma_t)
    denominator = alpha_t * sigma_s - alpha_s * sigma_t
    return _coefficient(sigma_s / denominator, x_t) * x_t - _coefficient(sigma_t / denominator, x_t) * x_s.to(x_t.dtype)
