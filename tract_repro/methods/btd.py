"""BTD: binary time distillation, i.e. progressive distillation (method-spec §4)."""
import gin
import torch

from tract_repro.common.errors import ConfigError
from tract_repro.diffusion import weighting as weightings
from tract_repro.diffusion.ddim import invert_ddim
from tract_repro.methods.base import Method, Target, guidance_range, noise_at, randint
from tract_repro.methods.phases import check_schedule
from tract_repro.networks.conditioning import as_cond
from tract_repro.sampling.steps import ddim_teacher_step


def btd_indices(S, p, T, n, generator, every_level=False):
    """(t, t_mid, s) for phase p: t = k·U{1..S_{p+1}}, one student step k = T/S_{p+1} split in two.

    ``every_level``: Meng et al.'s stochastic sampler's jumps (§7): t = (k/2)·U{1..S_p} from every level of the
    N = S_p grid, s = max(t − k, 0), i.e. 2/N jumps and, from the last level, the 1/N jump to 0 (t_mid = 0).
    """
    k = T // S[p + 1]
    if every_level:
        t = (k // 2) * randint(1, S[p], n, generator)
        return t, t - k // 2, (t - k).clamp(min=0)
    t = k * randint(1, S[p + 1], n, generator)
    return t, t - k // 2, t - k


def halving_schedule(start, final):
    """(start, start/2, …, final)."""
    S = [int(start)]
    while S[-1] > final:
        if S[-1] % 2:
            raise ConfigError(f"BTD halving from {start} reaches the odd count {S[-1]} before {final}: start from a power of two")
        S.append(S[-1] // 2)
    if S[-1] != final:
        raise ConfigError(f"BTD cannot halve {start} down to {final}")
    return tuple(S)


@gin.configurable
class BTD(Method):
    """x̃ = inversion t → s of two teacher steps t → t_mid → s (x̂ at t_mid where s = 0); w = max(SNR_t, 1).

    ``clip``: clip the teacher's x̂ to [−1, 1] inside its steps.  Off by default, as in progressive distillation
    (method-spec §4); on, BTD's targets follow TRACT's rule (its teacher and self-teacher steps clip), which
    matters under guidance, where x̂^w leaves [−1, 1] (docs/guided.md, "Clipping inside targets").

    ``stochastic``: the last phase, S_{P−1} = N → N/2, trains the student Meng et al.'s stochastic N-step
    sampler needs: 2/N jumps from *every* level of the N-step grid (not only from every other one), and the
    1/N jump from the last level, whose target is the teacher's x̂ (guided-notes §2; method-spec §7).
    """

    def __init__(self, start_steps=None, final_steps=1, weighting="truncated_snr", teacher_step=ddim_teacher_step,
                 guidance=None, stochastic=False, clip=False):
        self.start_steps, self.final_steps, self.stochastic = start_steps, int(final_steps), bool(stochastic)
        self.clip = bool(clip)
        self.guidance = guidance_range(guidance, "BTD")
        self.weight_fn = weightings.get(weighting)
        self.teacher_step = teacher_step

    def steps(self, T):
        start = T if self.start_steps is None else int(self.start_steps)
        return check_schedule(halving_schedule(start, self.final_steps), T)

    @torch.no_grad()
    def __call__(self, x, cond, phase, nets, grid, generator):
        S = self.steps(grid.T)
        every_level = self.stochastic and phase.index == len(S) - 2
        t, t_mid, s = (i.to(x.device) for i in btd_indices(S, phase.index, grid.T, x.shape[0], generator, every_level))
        x_t, logsnr_t, alpha_t, sigma_t = noise_at(x, t, grid, generator)
        cond = self.with_guidance(cond, generator, x.shape[0], x.device)
        x_mid, x_hat_t = self.teacher_step(nets.teacher, x_t, t, t_mid, grid, cond, clip=self.clip)
        if not every_level:
            x_s, x_hat_mid = self.teacher_step(nets.teacher, x_mid, t_mid, s, grid, cond, clip=self.clip)
        else:  # from the last level (t_mid = 0) the first step has reached the clean end: its x̂ is the target
            x_s, x_hat_mid, two = x_mid.clone(), x_hat_t.clone(), t_mid > 0
            x_s[two], x_hat_mid[two] = self.teacher_step(nets.teacher, x_mid[two], t_mid[two], s[two], grid,
                                                         as_cond(cond)[two], clip=self.clip)
        _, alpha_s, sigma_s = grid.at(s)
        x_target = invert_ddim(x_t, x_s, alpha_t, sigma_t, alpha_s, sigma_s)
        final = (s == 0).view(-1, 1, 1, 1)
        x_hat_mid = x_hat_mid.clamp(-1, 1) if self.clip else x_hat_mid  # x̂ as the clipped step to s = 0 lands
        x_target = torch.where(final, x_hat_mid, x_target)
        return Target(x_t, logsnr_t, x_target, self.weight_fn(logsnr_t), cond)
