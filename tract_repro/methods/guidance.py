"""Guided distillation, stage 1 (Meng et al. 2023; method-spec §7): classifier-free guidance distilled
into a student that takes the guidance weight w as an input."""
import gin
import torch

from tract_repro.common.batch_random import as_batch_random
from tract_repro.common.errors import ConfigError
from tract_repro.methods.base import Method, Target, draw_w
from tract_repro.methods.diffusion_loss import TeacherTraining
from tract_repro.networks.conditioning import Cond, as_cond
from tract_repro.networks.guidance import GuidedDenoiser, takes_input


@gin.configurable
class GuidedDistillation(Method):
    """x̃ = x̂^w(x_t, c) = (1 + w)·x̂(x_t, c) − w·x̂(x_t, ∅) of the guided teacher at w ~ U[w_min, w_max]; x_t and
    the weight as in the teacher's own loss (``TeacherTraining.*`` of this run: weighting, time distribution).

    The student is the teacher's network with a w input, initialised from the teacher; its w branch starts
    at zero, so at first it predicts the teacher's conditional x̂(x_t, c) for every w.
    """

    new_inputs = ("w",)
    guided_teacher = True

    def __init__(self, w_min=0.0, w_max=4.0, loss=None, grid_w=1.0):
        if not (isinstance(w_min, (int, float)) and isinstance(w_max, (int, float)) and 0 <= w_min <= w_max):
            raise ConfigError(f"GuidedDistillation.w_min = {w_min!r}, w_max = {w_max!r}: give 0 ≤ w_min ≤ w_max, e.g. 0 and 4")
        self.w_min, self.w_max, self.grid_w = float(w_min), float(w_max), float(grid_w)
        self.loss = loss if loss is not None else TeacherTraining()

    def steps(self, T):
        return self.loss.steps(T)

    @property
    def w_range(self):
        return self.w_min, self.w_max

    def sampling_w(self):
        """Sample grids during training show the student at w = ``grid_w``."""
        return self.grid_w

    def check(self, student, data):
        conditioned = data.num_classes > 1 or getattr(data, "text", False)  # class labels, or captions (latents)
        if not (takes_input(student, "w") and getattr(student, "conditional", False) and conditioned):
            raise ConfigError("guided distillation trains a conditional student (class labels or captions) with a w "
                              "input: set UNet.extra_conditions = ('w',) on the teacher's class-conditional network, "
                              "or diffusers_network.time_cond_proj_dim on a diffusers UNet or DiT")

    @torch.no_grad()
    def __call__(self, x, cond, phase, nets, grid, generator):
        rng = as_batch_random(generator, x.shape[0])
        x_t, logsnr = self.loss.noised(x, grid, rng)
        cond = as_cond(cond)
        w = draw_w(rng, self.w_min, self.w_max).to(x.device)
        cond = Cond(cond.labels, {**cond.extra, "w": w})
        target = GuidedDenoiser(nets.teacher)(x_t, logsnr, cond)
        return Target(x_t, logsnr, target, self.loss.weight_fn(logsnr), cond)
