"""Optimiser, learning-rate schedule and the inference-EMA momentum μ_I, each bound in gin."""
import dataclasses
import math

import gin
import torch

from tract_repro.common.errors import ConfigError
from tract_repro.methods.ema import momentum_from_residual


@gin.configurable
def adam(params, lr=2e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, foreach=True):
    """torch.optim.Adam with the official defaults (lr 2e-4, no weight decay).

    ``foreach``: one multi-tensor update instead of a loop over the parameters.  torch picks it by
    itself only on CUDA; on the CPU it is the same arithmetic (bit-identical, tested) and halves the
    update's time, a tenth of a digits-scale step.
    """
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or lr < 0:
        raise ConfigError(f"adam.lr = {lr!r}: give a learning rate, a number at least 0 (e.g. 2e-4)")
    return torch.optim.Adam(params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, foreach=foreach)


@gin.configurable
def learning_rate(base_lr, samples, phase, warmup=0, decay="constant"):
    """lr = base·min(1, samples/warmup), times 1 − (samples − start)/length within a phase if decay = 'linear'."""
    lr = base_lr * (min(1.0, samples / warmup) if warmup else 1.0)
    if decay == "linear":
        lr *= 1.0 - (samples - phase.start) / phase.length
    elif decay != "constant":
        raise ConfigError(f"learning_rate.decay = {decay!r}: choose 'constant' or 'linear'")
    return lr


@gin.configurable("inference_ema_momentum")
@dataclasses.dataclass(frozen=True)
class InferenceEMA:
    """μ_I: fixed if ``momentum`` is set, else r^(1/n) from a residual r and the n steps of a phase (method-spec §5).

    Bound in gin as ``inference_ema_momentum.momentum`` or ``.residual``; a fixed momentum wins if both are set.
    A run trains with one of them (:meth:`check`); a finished run is rebuilt without.
    """

    momentum: float = None
    residual: float = None

    def __post_init__(self):
        if self.momentum is not None:
            if isinstance(self.momentum, bool) or not isinstance(self.momentum, (int, float)) or not 0.0 <= self.momentum < 1.0:
                raise ConfigError(f"inference_ema_momentum.momentum (μ_I) = {self.momentum!r}: give a value in [0, 1)")
            object.__setattr__(self, "momentum", float(self.momentum))
            object.__setattr__(self, "residual", None)
        elif self.residual is not None:
            if isinstance(self.residual, bool) or not isinstance(self.residual, (int, float)) or not 0.0 < self.residual < 1.0:
                raise ConfigError(f"inference_ema_momentum.residual (μ_I's residual) = {self.residual!r}: give a value in (0, 1)")
            object.__setattr__(self, "residual", float(self.residual))

    def check(self):
        """One line if neither μ_I setting is bound; returns the setting."""
        if self.momentum is None and self.residual is None:
            raise ConfigError("set inference_ema_momentum.momentum (fixed μ_I) or inference_ema_momentum.residual (derived μ_I)")
        return self

    def for_phase(self, phase, batch_size):
        """μ_I for the ⌈length / batch⌉ steps of ``phase``."""
        self.check()
        if self.momentum is not None:
            return self.momentum
        return momentum_from_residual(self.residual, math.ceil(phase.length / batch_size))

    @property
    def label(self):
        """The setting as text, 'momentum=0.999' or 'residual=0.001': names its EMA in checkpoints and run.json."""
        return f"momentum={self.momentum!r}" if self.momentum is not None else f"residual={self.residual!r}"

    @property
    def setting(self):
        """The setting as gin would bind it, e.g. {'residual': 0.001}."""
        return {"momentum": self.momentum} if self.momentum is not None else {"residual": self.residual}
