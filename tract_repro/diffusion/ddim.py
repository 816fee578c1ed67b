"""The deterministic DDIM step and its inversion (method-spec §2, §6).

With α = 1 these are also the DDIM-VE step and inversion of TRACT-EDM.
"""


def ddim_step(x_t, x_hat, alpha_t, sigma_t, alpha_s, sigma_s, clip=False):
    """x_s = α_s·x̂ + σ_s·ε̂ with ε̂ = (x_t − α_t·x̂)/σ_t; x̂ clipped to [−1, 1] if ``clip``."""
    if clip:
        x_hat = x_hat.clamp(-1.0, 1.0)
    eps_hat = (x_t - alpha_t * x_hat) / sigma_t
    return alpha_s * x_hat + sigma_s * eps_hat


def invert_ddim(x_t, x_s, alpha_t, sigma_t, alpha_s, sigma_s):
    """x̃ = (σ_s·x_t − σ_t·x_s)/(α_t·σ_s − α_s·σ_t): the x̂ whose unclipped step t→s lands on x_s."""
    return (sigma_s * x_t - sigma_t * x_s) / (alpha_t * sigma_s - alpha_s * sigma_t)
