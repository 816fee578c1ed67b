"""The denoiser contract shared by every method, sampler and evaluation.

D(x_t, λ, cond) → x̂: float64 in and out, the network itself runs in float32.  A VP
denoiser turns the network head into x̂ with a parameterisation (method-spec §2); an
EDM VE denoiser applies EDM's preconditioning behind the same call (method-spec §6).  ``cond``
is a :class:`~tract_repro.networks.conditioning.Cond` (class labels and named extra inputs), or a
tensor of class labels, or None.
"""
import torch
from torch import nn

from tract_repro.common.errors import ConfigError
from tract_repro.diffusion import parameterisations
from tract_repro.networks.conditioning import as_cond


class VPDenoiser(nn.Module):
    """x̂ = param(x_t, F(x_t, λ, cond), α, σ) for a network F and a parameterisation."""

    def __init__(self, net, schedule, parameterisation="v"):
        super().__init__()
        self.net = net
        self.schedule = schedule
        self.parameterisation = parameterisation
        self._to_x = parameterisations.get(parameterisation)
        expected = parameterisations.OUTPUTS[parameterisation]
        outputs = getattr(net, "num_outputs", expected)
        if outputs != expected:
            raise ConfigError(
                f"parameterisation {parameterisation!r} needs a network with num_outputs={expected}, "
                f"got {outputs}: set UNet.num_outputs = {expected}")

    @property
    def num_classes(self):
        return getattr(self.net, "num_classes", 1)

    @property
    def conditional(self):
        """Whether labels reach the network: a class-conditional network, or one that says so (a text model)."""
        return getattr(self.net, "conditional", getattr(self.net, "num_classes", 1) > 1)

    def forward(self, x_t, logsnr, cond=None):
        cond = as_cond(cond)
        alpha, sigma = self.schedule.alpha_sigma(logsnr)
        alpha, sigma = alpha.view(-1, 1, 1, 1), sigma.view(-1, 1, 1, 1)
        extra = {"cond": {k: v.float() for k, v in cond.extra.items()}} if cond.extra else {}
        logsnr_in = logsnr.to(getattr(self.net, "logsnr_dtype", torch.float32))  # float64 for a net that asks
        out = self.net(x_t.float(), logsnr_in, cond.labels if self.conditional else None, **extra)
        if x_t.dtype != torch.float64:  # float32 targets (Device.precision): α and σ rounded last
            alpha, sigma = alpha.to(x_t.dtype), sigma.to(x_t.dtype)
        return self._to_x(x_t, out.to(x_t.dtype), alpha, sigma)


def build_denoiser(net, schedule, parameterisation):
    """The denoiser for a network: a VP parameterisation (x, eps, v, both), or 'edm' preconditioning on a VE schedule."""
    process = getattr(schedule, "process", "vp")
    if parameterisation == "edm":
        if process != "ve":
            raise ConfigError(f"parameterisation 'edm' needs a VE schedule (train.schedule = @EDMSchedule), got {type(schedule).__name__}")
        from tract_repro.networks.edm_denoiser import EDMDenoiser

        return EDMDenoiser(net)
    if process != "vp":
        raise ConfigError(f"a {type(schedule).__name__} (VE) schedule needs train.parameterisation = 'edm', got {parameterisation!r}")
    own = getattr(net, "schedule", None)  # a network trained on a schedule of its own (a diffusers teacher)
    if own is not None and own != schedule:
        made = repr(schedule) if type(schedule).__repr__ is not object.__repr__ else type(schedule).__name__
        raise ConfigError(f"the network was trained on {own!r} but train.schedule makes {made}: bind "
                          f"train.schedule = @diffusers_schedule with diffusers_schedule.folder = the model's folder")
    return VPDenoiser(net, schedule, parameterisation)
