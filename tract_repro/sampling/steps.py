"""One teacher step from grid index t to s, as used inside distillation targets."""
import torch

from tract_repro.diffusion.ddim import ddim_step


@torch.no_grad()
def ddim_teacher_step(denoiser, x_t, t, s, grid, cond=None, clip=True):
    """x_s = DDIM(x_t, D(x_t, λ_t), t → s); also returns D's x̂ (method-spec §2)."""
    logsnr_t, alpha_t, sigma_t = grid.at(t)
    _, alpha_s, sigma_s = grid.at(s)
    x_hat = denoiser(x_t, logsnr_t, cond)
    return ddim_step(x_t, x_hat, alpha_t, sigma_t, alpha_s, sigma_s, clip=clip), x_hat
