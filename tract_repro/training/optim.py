"""Optimiser, learning-rate schedule and the inference-EMA momentum, each bound in gin."""
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


@gin.configurable
def inference_ema_momentum(phase, batch_size, momentum=None, residual=None):
    """μ_I: fixed if ``momentum`` is set, else r^(1/n) from a residual r and the n steps of the phase (method-spec §5)."""
    inference_ema_label(momentum, residual)  # one of the two must be set, and valid: the one-line error if not
    if momentum is not None:
        return float(momentum)
    return momentum_from_residual(residual, math.ceil(phase.length / batch_size))


def inference_ema_label(momentum=None, residual=None):
    """A μ_I setting as text, 'momentum=0.999' (fixed) or 'residual=0.001' (derived per phase): names an EMA in checkpoints."""
    if momentum is not None:
        if not isinstance(momentum, (int, float)) or not 0.0 <= momentum < 1.0:
            raise ConfigError(f"inference_ema_momentum.momentum (μ_I) = {momentum!r}: give a value in [0, 1)")
        return f"momentum={float(momentum)!r}"
    if residual is not None:
        if not isinstance(residual, (int, float)) or not 0.0 < residual < 1.0:
            raise ConfigError(f"inference_ema_momentum.residual (μ_I's residual) = {residual!r}: give a value in (0, 1)")
        return f"residual={float(residual)!r}"
    raise ConfigError("set inference_ema_momentum.momentum (fixed μ_I) or inference_ema_momentum.residual (derived μ_I)")


def inference_ema_setting(label):
    """The keyword arguments of :func:`inference_ema_momentum` that ``label`` names (its inverse)."""
    name, value = label.split("=", 1)
    return dict(momentum=float(value), residual=None) if name == "momentum" else dict(momentum=None, residual=float(value))


def bound_inference_ema_label():
    """The label of the μ_I setting bound in gin (inference_ema_momentum.momentum or .residual)."""
    return inference_ema_label(**gin.get_bindings(inference_ema_momentum))
