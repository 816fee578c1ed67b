"""The one training loop: every method is a target function on it (method-spec §3-5).

A run directory describes itself: ``config.gin`` (what was asked), ``operative_config.gin``
(every value used), ``run.json``, ``metrics.jsonl``, ``checkpoints/``, ``samples/*.png`` and,
when finished, ``ema.pt`` (the inference EMA's denoiser weights).

The same loop runs data-parallel over several processes (:mod:`tract_repro.training.distributed`):
``train.batch_size`` is the global batch, each rank trains on its slice of it (optionally in
``train.accumulate`` micro-batches), and rank 0 alone writes the run directory.
"""
import copy
import json
import time
from pathlib import Path

import gin
import torch
from tqdm import tqdm

from tract_repro.data.arrays import EpochOrder
from tract_repro.data.batch_random import StepRandom
from tract_repro.diffusion.grid import TimeGrid
from tract_repro.diffusion.schedules import CosineSchedule
from tract_repro.methods.base import Networks
from tract_repro.methods.ema import EMA
from tract_repro.methods.phases import phase_at, plan_phases
from tract_repro.networks.denoiser import build_denoiser
from tract_repro.sampling.images import save_grid
from tract_repro.sampling.samplers import noise_from_seeds, sample_grid_steps
from tract_repro.training import checkpoint as ckpt
from tract_repro.training import distributed, preemption
from tract_repro.training import teacher as teachers
from tract_repro.training.device import Device
from tract_repro.training.lengths import parse_samples
from tract_repro.training.optim import (
    adam, bound_inference_ema_label, inference_ema_label, inference_ema_momentum, inference_ema_setting, learning_rate,
)
from tract_repro.training.run_files import MetricsLog, write_json
from tract_repro.training.step import LossDiverged, apply_update, backward_share


PHASE_RESETS = {"inference_ema", "self_teacher", "optimizer", "student"}


def crossed(before, after, every):
    """Whether a step from ``before`` to ``after`` samples crosses a multiple of ``every``."""
    return bool(every) and after // every != before // every


@gin.configurable(denylist=["workdir", "pace"])
def train(workdir, method=gin.REQUIRED, network=gin.REQUIRED, dataset=gin.REQUIRED, schedule=CosineSchedule,
          T=1024, parameterisation="v", teacher=None, batch_size=128, accumulate=1, total=None, phase_lengths=None,
          grad_clip=1.0, loss_reduction="mean", phase_reset=(), seed=0, threads=1,
          checkpoint_every="64K", keep_checkpoints=2, log_every="8K", grid_every=None, grid_size=100,
          grid_scale=4, grid_max_steps=64, only_phase=None, previous=None, extra_inference_emas=(), device=None, pace=None):
    """Train ``method`` and write the run directory; resumes exactly from its newest checkpoint.

    With ``only_phase = p`` the run trains phase p alone; for p > 0 it continues exactly from the
    final checkpoint of ``previous``, the run of phase p − 1 (so DVC can share phases between runs).
    ``extra_inference_emas`` (e.g. ``[{'residual': 1e-3}, {'momentum': 0.999}]``) tracks further inference
    EMAs with other μ_I settings beside the run's own, in its checkpoints: a phase of this run then serves
    as the previous phase of runs that differ only in μ_I (each continues from the EMA of its own μ_I).
    ``device`` (a :class:`Device`, default ``Device()``) says where the networks run and in what precision.
    ``batch_size`` is the global batch of a step; with WORLD_SIZE > 1 in the environment each process
    trains on its slice of it, and ``accumulate = k`` splits each process's slice into k micro-batches
    whose gradients add up to the full-batch step (to float rounding).  ``pace`` (a
    :class:`~tract_repro.training.pacing.Pace`, set by the launcher for forked seeds) is told each step.
    """
    options = dict(locals())
    dev = options.pop("device")
    dev = dev if dev is not None else Device()
    with distributed.process_group(dev) as world:
        return _train(dev=dev, world=world, **options)


def _train(workdir, method, network, dataset, schedule, T, parameterisation, teacher, batch_size, accumulate, total,
           phase_lengths, grad_clip, loss_reduction, phase_reset, seed, threads, checkpoint_every, keep_checkpoints,
           log_every, grid_every, grid_size, grid_scale, grid_max_steps, only_phase, previous, extra_inference_emas, dev, world,
           pace):
    """The body of :func:`train`, in one process of ``world`` (a :class:`distributed.World`) on ``dev``."""
    torch.set_num_threads(int(threads))
    torch.manual_seed(seed)
    workdir = Path(workdir)
    if loss_reduction not in ("mean", "sum"):
        raise ValueError(f"train.loss_reduction = {loss_reduction!r}: choose 'mean' (over pixels) or 'sum' (official TRACT)")
    unknown = set(phase_reset) - PHASE_RESETS
    if unknown:
        raise ValueError(f"train.phase_reset has unknown entries {sorted(unknown)}: choose from {sorted(PHASE_RESETS)}")
    micro_batches = world.slices(batch_size, accumulate)  # this rank's [(start, stop)] in the global batch
    main = world.is_main  # only rank 0 writes files
    data = dataset()
    grid = TimeGrid(schedule(), T).to(dev.device)
    steps = method.steps(grid.T)
    phases = plan_phases(steps, total, phase_lengths)
    if any(p.length < batch_size for p in phases):
        raise ValueError(f"every phase must be at least one batch ({batch_size} samples) long, got {[p.length for p in phases]}")
    begin, end = (0, phases[-1].end) if only_phase is None else _phase_span(phases, only_phase, previous)
    every = {k: parse_samples(v) if v else 0 for k, v in
             dict(checkpoint=checkpoint_every, log=log_every, grid=grid_every).items()}

    student = dev.prepare(build_denoiser(network(), grid.schedule, parameterisation))
    info = dict(method=type(method).__name__, schedule_steps=list(steps), T=grid.T, parameterisation=parameterisation,
                noise_schedule=type(grid.schedule).__name__, batch_size=batch_size, world_size=world.size,
                accumulate=int(accumulate), seed=seed,
                phases=[dict(index=p.index, start=p.start, end=p.end, teacher_steps=p.teacher_steps,
                             student_steps=p.student_steps) for p in phases],
                parameters=sum(p.numel() for p in student.parameters()), dataset=data.name,
                device=dev.describe(), status="running")
    nets, self_teacher = Networks(), None
    if only_phase is not None:
        info.update(only_phase=only_phase, previous=str(previous) if previous else None)
    if method.needs_teacher and begin > 0:  # the teacher and everything else come from the previous phase's run
        nets.teacher = copy.deepcopy(student).eval().requires_grad_(False)
        info["teacher"] = _run_info(previous).get("teacher")  # the root teacher
    elif method.needs_teacher:
        if teacher is None:
            raise ValueError(f"{info['method']} distils a teacher: set train.teacher to a teacher run directory or weights file")
        info["teacher"] = str(teachers.load_into(student, teacher, expect=dict(parameterisation=parameterisation, noise_schedule=info["noise_schedule"])))
        info["teacher_sha256"] = ckpt.sha256(info["teacher"])
        nets.teacher = copy.deepcopy(student).eval().requires_grad_(False)
    if method.self_teacher_momentum is not None:
        self_teacher = EMA(student, method.self_teacher_momentum)
        nets.self_teacher = self_teacher.module
    own_ema = bound_inference_ema_label()  # μ_I of this run, e.g. 'residual=0.001'
    inference = EMA(student, inference_ema_momentum(phases[0], batch_size, **inference_ema_setting(own_ema)))
    extras = _extra_inference_emas(extra_inference_emas, own_ema, student, phases[0], batch_size)
    info.update(inference_ema=own_ema, extra_inference_emas=list(extras))
    optimizer = adam(student.parameters())
    base_lr = optimizer.param_groups[0]["lr"]
    generator = torch.Generator().manual_seed(seed)
    order = EpochOrder(len(data), seed)
    metrics = MetricsLog(workdir / "metrics.jsonl")
    if world.rank > 0:  # dropout: each rank its own stream; rank 0 keeps the single-process one
        torch.manual_seed(distributed.rank_seed(seed, world.rank))

    samples, current = 0, 0
    latest = ckpt.list_checkpoints(workdir / "checkpoints")
    if not latest and begin > 0:
        latest = [_previous_checkpoint(previous, begin, info)]
    latest = world.broadcast(latest)  # every rank resumes from the file rank 0 found
    if latest:
        state = ckpt.load(latest[-1])
        samples, current = state["samples"], state["phase"]
        student.load_state_dict(state["student"])
        optimizer.load_state_dict(state["optimizer"])
        tracked = _tracked_inference_emas(state, own_ema)
        for label, ema in [(own_ema, inference), *extras.items()]:
            if label not in tracked:
                raise ValueError(f"{latest[-1]} holds no inference EMA with {label} (only {', '.join(sorted(tracked))}): "
                                 f"add {inference_ema_setting(label)} to train.extra_inference_emas of the run that wrote it")
            ema.load_state_dict(tracked[label])
        if self_teacher is not None:
            self_teacher.load_state_dict(state["self_teacher"])
        if nets.teacher is not None:
            nets.teacher.load_state_dict(state["teacher"])
        _restore_global_rng(state, dev, world, seed)
        generator.set_state(state["rng_method"])
        if main:
            metrics.truncate(samples)
    world.check_in_sync([student], "at the start")
    if main:
        workdir.mkdir(parents=True, exist_ok=True)  # the launcher makes it; train() called directly may not
        (workdir / "operative_config.gin").write_text(gin.operative_config_str())
        write_json(workdir / "run.json", info)

    def save_checkpoint():
        rng_torch, rng_device = torch.get_rng_state(), dev.rng_state()
        every_rank = world.gather((rng_torch, rng_device))  # a collective: all ranks take part
        world.check_in_sync([student, inference.module], f"at sample {samples}")
        if not main:
            return
        state = dict(samples=samples, phase=current, student=student.state_dict(), optimizer=optimizer.state_dict(),
                     inference_ema=inference.state_dict(), inference_ema_label=own_ema,
                     extra_inference_emas=[dict(label=k, ema=e.state_dict()) for k, e in extras.items()], rng_torch=rng_torch,
                     rng_method=generator.get_state(), rng_device=rng_device)
        if world.size > 1:  # dropout streams of every rank, for an exact resume with the same world size
            state["rng_torch_ranks"] = [r for r, _ in every_rank]
            state["rng_device_ranks"] = [d for _, d in every_rank]
        if self_teacher is not None:
            state["self_teacher"] = self_teacher.state_dict()
        if nets.teacher is not None:
            state["teacher"] = nets.teacher.state_dict()
        ckpt.save_atomic(state, ckpt.checkpoint_path(workdir / "checkpoints", samples))
        ckpt.prune(workdir / "checkpoints", keep_checkpoints)
        (workdir / "operative_config.gin").write_text(gin.operative_config_str())  # now including the loop's own calls

    def save_samples(name, student_steps):
        noise = noise_from_seeds(range(grid_size), data.shape).to(dev.device)
        labels = (torch.arange(grid_size) % data.num_classes).to(dev.device)
        with dev.autocast():
            x = sample_grid_steps(inference.module, grid, student_steps, noise, labels).cpu()
        save_grid(x.clamp(-1, 1), workdir / "samples" / name, scale=grid_scale)

    bar = tqdm(total=end - begin, initial=samples - begin, unit="sample", unit_scale=True, desc=f"{info['method']} {workdir.name}",
               dynamic_ncols=True, **({} if main else dict(disable=True)))
    tick = time.perf_counter()
    first = samples
    while samples < end:
        phase = phase_at(phases, samples)
        if phase.index != current:  # phase boundary: the teacher becomes the inference EMA (method-spec §5)
            nets.teacher.load_state_dict(inference.module.state_dict())
            for label, ema in [(own_ema, inference), *extras.items()]:  # each μ_I for the new phase's length
                ema.momentum = inference_ema_momentum(phase, batch_size, **inference_ema_setting(label))
            _apply_resets(phase_reset, student, nets.teacher, self_teacher, [inference, *extras.values()], optimizer)
            current = phase.index
        idx = order.indices(samples, batch_size)
        draws = StepRandom(generator, batch_size)  # the step's random tensors, drawn for the whole global batch
        optimizer.zero_grad(set_to_none=True)
        loss = None
        for start, stop in micro_batches:
            rng = draws.slice(start, stop)
            x, labels = (None if v is None else v.to(dev.device) for v in data.batch(idx[start:stop], rng))
            with dev.autocast():
                target = method(x, labels, phase, nets, grid, rng)
            share = backward_share(target, student, batch_size, loss_reduction, dev.autocast)
            loss = share if loss is None else loss + share
            del target, x, labels
        lr = learning_rate(base_lr, samples, phase)
        try:
            loss, grad_norm = apply_update(student, optimizer, loss, lr, grad_clip,
                                           [e for e in (self_teacher, inference, *extras.values()) if e is not None], world)
        except LossDiverged:
            raise LossDiverged(f"the loss became non-finite at sample {samples} ({info['method']}, parameterisation "
                               f"{parameterisation!r}); ε with truncated-SNR weighting is known to diverge") from None
        before, samples = samples, samples + batch_size
        bar.update(batch_size)
        if pace is not None:
            pace((samples - first) // batch_size)
        metrics.add(loss=loss.item(), grad_norm=grad_norm.item())
        if crossed(before, samples, every["log"]) or crossed(before, samples, every["checkpoint"]) or samples >= end:
            now = time.perf_counter()
            record = metrics.flush(samples=samples, phase=phase.index, student_steps=phase.student_steps, lr=lr)
            record["samples_per_s"] = round((samples - metrics.last_samples_flushed) / max(now - tick, 1e-9), 2)
            tick = now
            if main:
                metrics.write(record)
            bar.set_postfix(loss=f"{record['loss']:.4g}", phase=phase.index)
        grid_due = crossed(before, samples, every["grid"]) or phase.end <= samples < end
        if main and grid_due and phase.student_steps <= grid_max_steps:  # many-step grids belong to evaluation
            save_samples(f"grid_{samples:012d}_{phase.student_steps}steps.png", phase.student_steps)
        if crossed(before, samples, every["checkpoint"]) or samples >= end:
            save_checkpoint()
        # A stop request (SLURM's signal) reaches rank 0's process; every rank stops at the same step.
        preemption.at_step_boundary(save_checkpoint, ckpt.checkpoint_path(workdir / "checkpoints", samples), samples,
                                    requested=world.any(preemption.requested()))
    bar.close()
    if pace is not None:
        pace.leave()
    final_steps = phase_at(phases, end - 1).student_steps
    if main:
        if final_steps <= grid_max_steps:  # a 512-step student's grid costs more than its phase: evaluation draws those
            save_samples(f"final_{final_steps}steps.png", final_steps)
        ckpt.save_atomic(inference.module.state_dict(), workdir / "ema.pt")
        info.update(status="complete", samples=samples, final_student_steps=final_steps)
        write_json(workdir / "run.json", info)
    world.barrier()  # no rank returns before the run directory is complete
    return workdir


def _phase_span(phases, only_phase, previous):
    """(start, end) in samples of the single phase a run trains."""
    if not 0 <= only_phase < len(phases):
        raise ValueError(f"train.only_phase = {only_phase}, but the schedule has phases 0..{len(phases) - 1}")
    if only_phase > 0 and previous is None:
        raise ValueError(f"train.only_phase = {only_phase} continues a run: set train.previous to the run of phase {only_phase - 1}")
    return phases[only_phase].start, phases[only_phase].end


def _run_info(run_dir):
    """run.json of another run, with a one-line error if it isn't a run directory."""
    path = Path(run_dir) / "run.json"
    if not path.is_file():
        raise ValueError(f"train.previous = {run_dir} is not a run directory (no run.json): run the previous phase first")
    return json.loads(path.read_text())


def _previous_checkpoint(previous, begin, info):
    """The final checkpoint of the previous phase's run, checked to be the same schedule and method."""
    previous = Path(previous)
    first = -(-begin // info["batch_size"]) * info["batch_size"]  # runs step in whole batches: the first step of this phase
    path = ckpt.checkpoint_path(previous / "checkpoints", first)
    if not path.is_file():
        raise ValueError(f"train.previous = {previous} has no checkpoint at sample {first}: run that phase first")
    theirs, p = _run_info(previous), info["only_phase"]
    mine = dict(info, schedule_steps=info["schedule_steps"][:p + 1], phases=info["phases"][:p])
    theirs.update(schedule_steps=theirs["schedule_steps"][:p + 1], phases=theirs["phases"][:p])
    for key in ("method", "schedule_steps", "T", "phases", "batch_size", "seed", "parameterisation"):
        if theirs.get(key) != mine.get(key):  # the phases before this one must be the same computation
            raise ValueError(f"train.previous = {previous} differs from this run in {key} ({theirs.get(key)!r} vs "
                             f"{mine.get(key)!r}): continue a run of the same configuration")
    return path


def _restore_global_rng(state, dev, world, seed):
    """torch's global (and device) RNG from a checkpoint: this rank's own state when the checkpoint has one.

    A checkpoint of W > 1 ranks holds every rank's state; resumed with the same W each rank continues
    its own dropout stream exactly.  With another W, rank 0 takes the saved rank-0 state and the
    others start fresh streams from (seed, rank, samples): dropout then differs from an uninterrupted run.
    """
    ranks = state.get("rng_torch_ranks")
    if world.size == 1 or (ranks is not None and len(ranks) == world.size):
        torch.set_rng_state(ranks[world.rank] if world.size > 1 else state["rng_torch"])
        dev.set_rng_state(state["rng_device_ranks"][world.rank] if world.size > 1 else state.get("rng_device"))
    elif world.rank == 0:
        torch.set_rng_state(state["rng_torch"])
        dev.set_rng_state(state.get("rng_device"))
    else:
        torch.manual_seed(distributed.rank_seed(seed * 1_000_003 + state["samples"], world.rank))


def _extra_inference_emas(settings, own, student, phase, batch_size):
    """{label: EMA} for ``train.extra_inference_emas``, each with its own μ_I for ``phase``."""
    extras = {}
    for setting in settings:
        unknown = set(setting) - {"momentum", "residual"}
        if unknown:
            raise ValueError(f"train.extra_inference_emas entry {setting} has {sorted(unknown)}: use {{'momentum': m}} or {{'residual': r}}")
        label = inference_ema_label(**setting)
        if label == own or label in extras:
            raise ValueError(f"train.extra_inference_emas lists {label} twice (or as the run's own μ_I): list each setting once")
        extras[label] = EMA(student, inference_ema_momentum(phase, batch_size, **inference_ema_setting(label)))
    return extras


def _tracked_inference_emas(state, own):
    """{label: EMA state} of the inference EMAs in a checkpoint (one written before labels holds only its own)."""
    tracked = {state.get("inference_ema_label", own): state["inference_ema"]}
    tracked.update({e["label"]: e["ema"] for e in state.get("extra_inference_emas", [])})
    return tracked


def _apply_resets(resets, student, teacher, self_teacher, inferences, optimizer):
    """Optional resets at a phase boundary; by default the student, self-teacher and optimiser carry on."""
    if "student" in resets:
        student.load_state_dict(teacher.state_dict())
    if "self_teacher" in resets and self_teacher is not None:
        self_teacher.restart()
    if "inference_ema" in resets:
        for ema in inferences:
            ema.restart()
    if "optimizer" in resets:
        optimizer.state.clear()
