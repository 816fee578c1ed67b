"""The one training loop: every method is a target function on it (method-spec §3-5).

:func:`train` builds a run from its :class:`~tract_repro.training.options.Options` (gin: ``train.*``),
resumes it from its newest checkpoint if there is one, and steps until its span of samples is trained.  What it is made of:
the :class:`~tract_repro.training.state.TrainingState` (everything a resume needs), the
:class:`~tract_repro.training.phase_control.PhaseController` (phase boundaries), the
:class:`~tract_repro.training.run_files.RunDirectory` (every file of the run) and one
optimisation step (:mod:`tract_repro.training.step`).

The same loop runs data-parallel over several processes (:mod:`tract_repro.training.distributed`):
``train.batch_size`` is the global batch, each rank trains on its slice of it (optionally in
``train.accumulate`` micro-batches), and rank 0 alone writes the run directory.
"""
import copy
import time

import torch
from tqdm import tqdm

from tract_repro.common.batch_random import StepRandom, step_generator
from tract_repro.common.errors import ConfigError
from tract_repro.common.files import sha256
from tract_repro.common.lengths import parse_samples
from tract_repro.data.arrays import EpochOrder
from tract_repro.methods.ema import EMA
from tract_repro.methods.phases import phase_at, plan_phases
from tract_repro.networks.conditioning import Cond, as_cond
from tract_repro.sampling import registry
from tract_repro.sampling.samplers import noise_from_seeds
from tract_repro.training import checkpoint as ckpt
from tract_repro.training import distributed, preemption
from tract_repro.training import phase_control, teacher as teachers
from tract_repro.training.device import Device
from tract_repro.training.options import Options
from tract_repro.training.run_files import RunDirectory
from tract_repro.training.state import TrainingState, inference_emas
from tract_repro.training.step import LossDiverged, apply_update, backward_share
from tract_repro.training.tensorboard import Off, open_board


def train(workdir, pace=None, config_text=None, **options):
    """Train ``method`` and write the run directory; resumes exactly from its newest checkpoint.

    The options are :class:`~tract_repro.training.options.Options` (gin ``train.*``), given here as
    keywords or bound in gin.  With ``only_phase = p`` the run trains phase p alone; for p > 0 it
    continues exactly from the final checkpoint of ``previous``, the run of phase p − 1 (so DVC can
    share phases between runs).  With WORLD_SIZE > 1 in the environment each process trains on its
    slice of the global batch.  Ctrl-C or SIGTERM stops the run at the next step boundary with a checkpoint.
    """
    o = Options(workdir=workdir, pace=pace, config_text=config_text, **options)  # checked by Run
    if o.device is None:
        o.device = Device()
    with distributed.process_group(o.device) as world:
        return Run(o, world).train()


class Run:
    """One process's part of a run: built from :class:`Options`, resumed, then trained step by step."""

    def __init__(self, o, world):
        self.o, self.world, self.dev = o.check(), world, o.device
        torch.set_num_threads(int(o.threads))
        torch.manual_seed(o.seed)
        self.micro_batches = world.slices(o.batch_size, o.accumulate)  # this rank's [(start, stop)] in the global batch
        self.data = o.dataset()
        self.grid = o.build_grid().to(self.dev.device)
        self.phases = plan_phases(o.method.steps(self.grid.T), o.total, o.phase_lengths)
        if any(p.length < o.batch_size for p in self.phases):
            raise ConfigError(f"every phase must be at least one batch ({o.batch_size} samples) long, "
                              f"got {[p.length for p in self.phases]}")
        self.controller = phase_control.PhaseController(self.phases, o.batch_size, o.phase_reset)
        self.begin, self.end = phase_control.span(self.phases, o.only_phase, o.previous)
        self.every = {k: parse_samples(v) if v else 0 for k, v in
                      dict(checkpoint=o.checkpoint_every, log=o.log_every, grid=o.grid_every).items()}
        self.state, self.info = self._build()
        self.dev.compile_networks(self.state.student, self.state.nets.teacher, self.state.nets.self_teacher)
        self.order = EpochOrder(len(self.data), o.seed)
        self.files = RunDirectory(o.workdir, world.is_main, o.keep_checkpoints)
        self.board = Off()  # the TensorBoard log, opened once the run has resumed
        if world.rank > 0:  # dropout: each rank its own stream; rank 0 keeps the single-process one
            torch.manual_seed(distributed.rank_seed(o.seed, world.rank))

    def _build(self):
        """The training state at sample 0, and the run's run.json."""
        o, phases = self.o, self.phases
        student = self.dev.prepare(o.build_denoiser(self.grid.schedule))
        o.method.check(student, self.data)
        if o.method.clip and not bounded(self.data):
            name = type(o.method).__name__
            raise ConfigError(f"{name}.clip = True clips the teacher's x̂ to [−1, 1], but this data set is not bounded "
                              f"there (latents): set {name}.clip = False")
        info = dict(method=type(o.method).__name__, schedule_steps=list(o.method.steps(self.grid.T)), T=self.grid.T,
                    parameterisation=o.parameterisation, noise_schedule=type(self.grid.schedule).__name__,
                    batch_size=o.batch_size, world_size=self.world.size, accumulate=int(o.accumulate), seed=o.seed,
                    phases=[dict(index=p.index, start=p.start, end=p.end, teacher_steps=p.teacher_steps,
                                 student_steps=p.student_steps) for p in phases],
                    parameters=sum(p.numel() for p in student.parameters()), dataset=self.data.name,
                    bounded=bounded(self.data), device=self.dev.describe(), status="running")
        if o.only_phase is not None:
            info.update(only_phase=o.only_phase, previous=str(o.previous) if o.previous else None)
        if o.method.guided:  # a guided teacher, or a w-conditioned student
            info.update(p_uncond=o.method.p_uncond or None, guided=True, w_range=o.method.w_range)
        teacher = self._teacher(student, info)
        self_teacher = None if o.method.self_teacher_momentum is None else EMA(student, o.method.self_teacher_momentum)
        inference = inference_emas(o.inference_ema, o.extra_inference_emas, student, phases[0], o.batch_size)
        info.update(inference_ema=o.inference_ema.label, extra_inference_emas=[e.label for e in o.extra_inference_emas])
        optimizer = o.optimizer(student.parameters())
        self.base_lr = optimizer.param_groups[0]["lr"]
        generator = torch.Generator().manual_seed(o.seed)
        return TrainingState(student, teacher, self_teacher, inference, optimizer, generator, o.seed), info

    def _teacher(self, student, info):
        """The frozen teacher of the first phase trained (None for teacher training); records it in ``info``."""
        o = self.o
        if not o.method.needs_teacher:
            return None
        if self.begin > 0:  # the teacher and everything else come from the previous phase's run
            info["teacher"] = phase_control.run_info(o.previous).get("teacher")  # the root teacher
        elif o.teacher is None:
            raise ConfigError(f"{info['method']} distils a teacher: set train.teacher to a teacher run directory or weights file")
        else:
            info["teacher"] = str(teachers.load_into(student, o.teacher, expect=dict(
                parameterisation=o.parameterisation, noise_schedule=info["noise_schedule"]),
                new_inputs=o.method.new_inputs, guided=o.method.guided_teacher))
            info["teacher_sha256"] = sha256(info["teacher"])
        return copy.deepcopy(student).eval().requires_grad_(False)

    def resume(self):
        """Restore the newest usable checkpoint of this run (or the previous phase's final one); write the
        run's start files.  Rank 0 chooses the file (setting aside one that fails its checksum), every rank loads it."""
        path, state, problem = None, None, None
        if self.world.is_main:
            try:
                path, state = ckpt.newest_usable(self.files.checkpoints)
                if path is None and self.begin > 0:
                    path = phase_control.previous_checkpoint(self.o.previous, self.begin, self.info)
            except ConfigError as exc:  # every rank stops with rank 0's line, none waits for it
                problem = exc
        path, message = self.world.broadcast((path, None if problem is None else str(problem)))
        if message is not None:
            raise problem if problem is not None else ConfigError(message)
        own = state is not None  # this run's checkpoint (not the previous phase's final one)
        if path is not None:
            state = state if own else ckpt.load(path)
            self.state.load_state_dict(state, path, self.dev, self.world)
        if self.world.is_main:  # records of a run killed before its first checkpoint go too
            self.files.metrics.truncate(self.state.samples)
            if own and "metrics_partial" in state:  # a stop between records: the interval's sums so far
                self.files.metrics.restore(state["metrics_partial"])
        self.world.check_in_sync([self.state.student], "at the start")
        self.files.start(self.info, self.o.config_text)
        self.board = self.resumed_board()

    def resumed_board(self):
        """The TensorBoard log, without what a killed run logged after the checkpoint resumed from.  At the
        end of the span the final grid comes after the final checkpoint: that step is purged and logged again."""
        samples, at_end = self.state.samples, self.state.samples >= self.end
        board = open_board(self.files.tensorboard, samples if at_end else samples + 1,
                           enabled=self.o.tensorboard and self.world.is_main)
        if at_end and self.files.metrics.last_record is not None:
            board.scalars(self.files.metrics.last_record)
        return board

    def train(self):
        """Lock the run directory, resume, and train to the end; returns the workdir.  A run that raises (a diverged
        loss, any error) leaves run.json with status "failed" and the reason; a stop request (it checkpoints) does not."""
        with self.files.locked(), preemption.stop_on_signals():
            try:
                self.resume()
                self.steps()
            except preemption.Stopped:  # resumable: run.json stays as it was
                raise
            except Exception as exc:
                self.files.fail(dict(self.info, samples=self.state.samples), exc)
                raise
            finally:  # a stop request, a failure or the end: the log keeps what was logged
                self.board.close()
        return self.o.workdir

    def steps(self):
        """Step to the end of the span, then write ema.pt and the completed run.json."""
        o, state = self.o, self.state
        bar = tqdm(total=self.end - self.begin, initial=state.samples - self.begin, unit="sample", unit_scale=True,
                   desc=f"{self.info['method']} {o.workdir.name}", dynamic_ncols=True,
                   **({} if self.world.is_main else dict(disable=True)))
        self.tick, first = time.perf_counter(), state.samples
        while state.samples < self.end:
            phase = self.controller.enter(state)
            before = state.samples
            loss, grad_norm, lr = self.step(phase)
            bar.update(o.batch_size)
            if o.pace is not None:
                o.pace((state.samples - first) // o.batch_size)
            self.after_step(before, phase, loss, grad_norm, lr, bar)
        bar.close()
        if o.pace is not None:
            o.pace.leave()
        self.finish()

    def step(self, phase):
        """One optimisation step on the global batch at ``state.samples``: targets, backward, update."""
        o, state = self.o, self.state
        idx = self.order.indices(state.samples, o.batch_size)
        generator = state.generator if self.dev.noise == "cpu" else \
            step_generator(o.seed, state.samples // o.batch_size, self.dev.device)
        draws = StepRandom(generator, o.batch_size)  # the step's random tensors, drawn for the whole global batch
        state.optimizer.zero_grad(set_to_none=True)
        loss = None
        for start, stop in self.micro_batches:
            rng = draws.slice(start, stop)
            x, cond = self.data.batch(idx[start:stop], rng)  # cond: class labels, None, or a whole Cond
            x, cond = x.to(self.dev.device, self.dev.dtype), as_cond(cond).to(self.dev.device)
            with self.dev.autocast():
                target = o.method(x, cond, phase, state.nets, self.grid, rng)
            share = backward_share(target, state.student, o.batch_size, o.loss_reduction, self.dev.autocast)
            loss = share if loss is None else loss + share
            del target, x, cond
        lr = o.lr_schedule(self.base_lr, state.samples, phase)
        try:
            loss, grad_norm = apply_update(state.student, state.optimizer, loss, lr, o.grad_clip, state.emas, self.world)
        except LossDiverged:
            weighting = o.method.weight_fn  # declared by the Method contract (None but for a diffusion loss)
            hint = ("ε with truncated-SNR weighting is known to diverge: use the v or x-and-ε parameterisation"
                    if o.parameterisation == "eps" and getattr(weighting, "__name__", "") == "truncated_snr"
                    else f"lower the learning rate (e.g. --gin 'adam.lr = {self.base_lr / 10:g}', it was "
                         f"{self.base_lr:g}) or check the teacher and the data")
            raise LossDiverged(f"the loss became non-finite at sample {state.samples} ({self.info['method']}, "
                               f"parameterisation {o.parameterisation!r}): {hint}; "
                               f"{self.files.relaunch_advice()}") from None
        state.samples += o.batch_size
        return loss, grad_norm, lr

    def after_step(self, before, phase, loss, grad_norm, lr, bar):
        """Metrics, sample grids and checkpoints due after a step, then a stop request if there is one."""
        samples, every, files = self.state.samples, self.every, self.files
        files.metrics.add(loss=loss.item(), grad_norm=grad_norm.item())
        if crossed(before, samples, every["log"]) or crossed(before, samples, every["checkpoint"]) or samples >= self.end:
            now = time.perf_counter()
            record = files.metrics.flush(samples=samples, phase=phase.index, student_steps=phase.student_steps, lr=lr)
            record["samples_per_s"] = round((samples - files.metrics.last_samples_flushed) / max(now - self.tick, 1e-9), 2)
            self.tick = now
            if self.world.is_main:
                files.metrics.write(record)
                self.board.scalars(record)
            bar.set_postfix(loss=f"{record['loss']:.4g}", phase=phase.index)
        grid_due = crossed(before, samples, every["grid"]) or phase.end <= samples < self.end
        if grid_due and phase.student_steps <= self.o.grid_max_steps:  # many-step grids belong to evaluation
            self.save_samples(f"grid_{samples:012d}_{phase.student_steps}steps.png", phase.student_steps)
        if crossed(before, samples, every["checkpoint"]) or samples >= self.end:
            self.save_checkpoint()
        # A stop request (SLURM's signal) reaches rank 0's process; every rank stops at the same step.
        preemption.at_step_boundary(self.save_checkpoint, files.checkpoint_path(samples), samples,
                                    requested=self.world.any(preemption.requested()))

    def save_checkpoint(self):
        """A checkpoint of the state after this step (a collective: every rank takes part)."""
        rng_torch, rng_device = torch.get_rng_state(), self.dev.rng_state()
        every_rank = self.world.gather((rng_torch, rng_device))
        self.world.check_in_sync([self.state.student, self.state.inference_ema.module], f"at sample {self.state.samples}")
        if self.world.is_main:
            self.board.flush()  # what is logged up to a checkpoint survives a kill: a resume only purges what follows
            self.files.save_checkpoint(dict(self.state.state_dict(rng_torch, rng_device, every_rank),
                                            metrics_partial=self.files.metrics.partial()))

    def save_samples(self, name, student_steps):
        """A grid of the inference EMA's ``student_steps``-step DDIM samples, seeds 0..grid_size − 1, conditioned on
        the data set's ``grid_cond(grid_size)`` where it has one (captions, say), else on labels 0, 1, … in turn;
        decoded into images by the data set's ``decode`` where it has one (latents)."""
        if not self.world.is_main:
            return
        o, data = self.o, self.data
        noise = noise_from_seeds(range(o.grid_size), data.shape).to(self.dev.device)
        grid_cond = getattr(data, "grid_cond", None)
        cond = as_cond(grid_cond(o.grid_size)) if grid_cond is not None else \
            Cond(labels=torch.arange(o.grid_size) % data.num_classes)
        cond = o.method.sampling_cond(cond.to(self.dev.device))
        with self.dev.autocast():
            x = registry.sample("ddim", self.state.inference_ema.module, self.grid, student_steps, noise, cond,
                                clip=self.info["bounded"]).cpu()
        decode = getattr(data, "decode", None)
        x = x if decode is None else decode(x)
        self.files.save_grid(name, x.clamp(-1, 1), o.grid_scale)
        self.board.grid(student_steps, self.state.samples, x.clamp(-1, 1), o.grid_scale)

    def finish(self):
        """ema.pt and the completed run.json; no rank returns before the run directory is complete."""
        final_steps = phase_at(self.phases, self.end - 1).student_steps
        if final_steps <= self.o.grid_max_steps:  # a 512-step student's grid costs more than its phase: evaluation draws those
            self.save_samples(f"final_{final_steps}steps.png", final_steps)
        self.info.update(status="complete", samples=self.state.samples, final_student_steps=final_steps)
        self.files.finish(self.state.inference_ema.module.state_dict(), self.info)
        self.world.barrier()


def bounded(data):
    """Whether the data lie in [−1, 1] (pixels: samplers clip x̂ there), as the data set declares (``bounded``,
    False for latents); a data set that says nothing is bounded."""
    return bool(getattr(data, "bounded", True))


def crossed(before, after, every):
    """Whether a step from ``before`` to ``after`` samples crosses a multiple of ``every``."""
    return bool(every) and after // every != before // every
