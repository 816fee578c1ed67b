"""One optimisation step of the shared loop, for any method."""
import contextlib
import math

import torch


class LossDiverged(RuntimeError):
    """The loss became non-finite."""


def weighted_loss(pred, target, reduction="mean"):
    """L = mean_b w_b·‖x̂_θ − x̃‖², the squared error averaged ('mean') or summed ('sum') over pixels."""
    err = (pred - target.x_target).square().flatten(1)
    return (target.weight * (err.sum(1) if reduction == "sum" else err.mean(1))).mean()


def optimisation_step(target, student, optimizer, lr, grad_clip=1.0, reduction="mean", emas=(), autocast=contextlib.nullcontext):
    """Regress the student on one Target, clip the gradient norm, step Adam, then update the EMAs in order."""
    student.train()
    with autocast():
        pred = student(target.x_t, target.logsnr, target.labels)
    loss = weighted_loss(pred, target, reduction)
    if not torch.isfinite(loss):
        raise LossDiverged("the loss became non-finite")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(student.parameters(), grad_clip if grad_clip else math.inf)
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    for ema in emas:
        ema.update(student)
    return loss.detach(), grad_norm
