"""One optimisation step of the shared loop, for any method, in one process or data-parallel.

A step is one or more :func:`backward_share` calls (one per micro-batch: the process's slice of
the global batch, split ``train.accumulate`` ways), then one :func:`apply_update`.  The loss of
the step is the mean over the *global* batch of B per-sample weighted errors, so each micro-batch
back-propagates its per-sample sum divided by B; the gradients of the micro-batches add up in
``.grad`` and, across processes, are summed by :meth:`World.sum_gradients`.  The result is the
gradient of the single-process full-batch loss whichever way the batch was split.
"""
import contextlib
import math

import torch

from tract_repro.common.errors import JobFailed


class LossDiverged(JobFailed):
    """The loss became non-finite."""


def per_sample_loss(pred, target, reduction="mean"):
    """w_b·‖x̂_θ − x̃‖² per sample, the squared error averaged ('mean') or summed ('sum') over pixels."""
    err = (pred - target.x_target).square().flatten(1)
    return target.weight * (err.sum(1) if reduction == "sum" else err.mean(1))


def weighted_loss(pred, target, reduction="mean", batch_size=None):
    """This slice's share of L = (1/B)·Σ_b w_b·‖x̂_θ − x̃‖² over a global batch of B = ``batch_size`` samples.

    With the whole batch at hand (the default) this is the plain mean over the batch, computed as
    it always was; for a slice it is the slice's sum divided by B, so the shares add up to L.
    """
    per_sample = per_sample_loss(pred, target, reduction)
    if batch_size is None or batch_size == per_sample.shape[0]:
        return per_sample.mean()
    return per_sample.sum() / batch_size


def backward_share(target, student, batch_size=None, reduction="mean", autocast=contextlib.nullcontext):
    """Forward the student on one micro-batch's Target and add its share of the loss gradient to ``.grad``."""
    student.train()
    with autocast():
        pred = student(target.x_t, target.logsnr, target.cond)
    loss = weighted_loss(pred, target, reduction, batch_size)
    loss.backward()
    return loss.detach()


def apply_update(student, optimizer, loss, lr, grad_clip=1.0, emas=(), world=None):
    """Sum gradients and loss over ranks, stop on a non-finite loss, clip the global norm, step Adam, update the EMAs.

    ``loss`` is this process's summed share of the step's loss; the global loss is returned, with
    the gradient norm before clipping.  Every rank raises together on a non-finite loss.
    """
    if world is not None and world.size > 1:
        loss = world.sum_gradients(student.parameters(), loss)
    if not torch.isfinite(loss):
        raise LossDiverged("the loss became non-finite")
    grad_norm = torch.nn.utils.clip_grad_norm_(student.parameters(), grad_clip if grad_clip else math.inf)
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    for ema in emas:
        ema.update(student)
    return loss, grad_norm

