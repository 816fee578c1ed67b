"""TRACT: transitive-closure time distillation on VP/DDIM teachers (method-spec §5)."""
import gin
import torch

from tract_repro.common.errors import ConfigError
from tract_repro.diffusion import weighting as weightings
from tract_repro.diffusion.ddim import invert_ddim
from tract_repro.methods.base import Method, Target, guidance_range, noise_at, randint
from tract_repro.methods.phases import check_schedule
from tract_repro.networks.conditioning import as_cond
from tract_repro.sampling.steps import ddim_teacher_step


def tract_indices(S, p, T, n, generator):
    """(t, t₁, t_i) for phase p: t uniform over teacher-grid points of a group, t₁ = t − e, t_i its lower edge."""
    g, e, k = S[p] // S[p + 1], T // S[p], T // S[p + 1]
    t_top = k * randint(1, S[p + 1], n, generator)
    j = randint(0, g - 1, n, generator)
    t = t_top - j * e
    return t, t - e, t_top - k


@gin.configurable
class TRACT(Method):
    """x̃ = inversion t → t_i of [teacher step t → t₁, then self-teacher step t₁ → t_i]; w = max(SNR_t, 1)."""

    def __init__(self, schedule=(1024, 32, 1), self_teacher_momentum=0.5, weighting="truncated_snr",
                 teacher_step=ddim_teacher_step, clip=True, guidance=None):
        self.schedule = tuple(schedule)
        self.guidance = guidance_range(guidance, "TRACT")
        self.self_teacher_momentum = float(self_teacher_momentum)
        if not 0.0 <= self.self_teacher_momentum < 1.0:
            raise ConfigError(f"TRACT.self_teacher_momentum (μ_S) = {self_teacher_momentum}: give a value in [0, 1)")
        self.weight_fn = weightings.get(weighting)
        self.teacher_step, self.clip = teacher_step, clip

    def steps(self, T):
        return check_schedule(self.schedule, T)

    @torch.no_grad()
    def __call__(self, x, cond, phase, nets, grid, generator):
        S = self.steps(grid.T)
        t, t1, ti = (i.to(x.device) for i in tract_indices(S, phase.index, grid.T, x.shape[0], generator))
        x_t, logsnr_t, alpha_t, sigma_t = noise_at(x, t, grid, generator)
        cond = self.with_guidance(cond, generator, x.shape[0], x.device)  # the same w for teacher, self-teacher, student
        x_t1, _ = self.teacher_step(nets.teacher, x_t, t, t1, grid, cond, clip=self.clip)
        x_ti = x_t1.clone()
        rest = t1 != ti  # the self-teacher is only needed where the group is not finished
        if rest.any():
            x_ti[rest], _ = ddim_teacher_step(nets.self_teacher, x_t1[rest], t1[rest], ti[rest], grid,
                                              as_cond(cond)[rest], clip=self.clip)
        _, alpha_i, sigma_i = grid.at(ti)
        x_target = invert_ddim(x_t, x_ti, alpha_t, sigma_t, alpha_i, sigma_i)
        return Target(x_t, logsnr_t, x_target, self.weight_fn(logsnr_t), cond)
