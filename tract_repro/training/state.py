"""The training state: everything an exact resume needs, saved and restored as one dict.

Student, Adam, the inference EMA of the run's μ_I (and any extra μ_I tracked beside it), the
self-teacher EMA μ_S, the teacher of the current phase, the method's generator, torch's global
(and device) RNG states, the sample count and the phase index.  The data order is a pure function
of (seed, samples), so the sample count is its position.
"""
import torch

from tract_repro.common.errors import ConfigError
from tract_repro.methods.base import Networks
from tract_repro.methods.ema import EMA
from tract_repro.training import distributed


class TrainingState:
    """The networks and counters of a run, with ``state_dict``/``load_state_dict`` for checkpoints."""

    def __init__(self, student, teacher, self_teacher, inference, optimizer, generator, seed):
        self.student, self.optimizer, self.generator, self.seed = student, optimizer, generator, seed
        self.nets = Networks(teacher=teacher, self_teacher=None if self_teacher is None else self_teacher.module)
        self.self_teacher = self_teacher  # EMA μ_S, or None
        self.inference = inference  # {InferenceEMA: EMA}: the run's own μ_I first, then the extra ones
        self.samples, self.phase = 0, 0

    @property
    def own_setting(self):
        """The run's own μ_I setting (an :class:`~tract_repro.training.optim.InferenceEMA`)."""
        return next(iter(self.inference))

    @property
    def inference_ema(self):
        """The run's own inference EMA, whose weights are evaluated and become the next phase's teacher."""
        return self.inference[self.own_setting]

    @property
    def emas(self):
        """Every EMA, in the order they are updated after a step."""
        return [e for e in (self.self_teacher, *self.inference.values()) if e is not None]

    def set_inference_momenta(self, phase, batch_size):
        """μ_I of every inference EMA for the length of ``phase`` (method-spec §5)."""
        for setting, ema in self.inference.items():
            ema.momentum = setting.for_phase(phase, batch_size)

    def state_dict(self, rng_torch, rng_device, every_rank=None):
        """The checkpoint: this state plus the RNG states (``every_rank``: [(torch, device)] of all ranks)."""
        own, *extras = self.inference.items()
        state = dict(samples=self.samples, phase=self.phase, student=self.student.state_dict(),
                     optimizer=self.optimizer.state_dict(), inference_ema=own[1].state_dict(), inference_ema_label=own[0].label,
                     inference_ema_setting=own[0].setting,
                     extra_inference_emas=[dict(label=k.label, setting=k.setting, ema=e.state_dict()) for k, e in extras], rng_torch=rng_torch,
                     rng_method=self.generator.get_state(), rng_device=rng_device)
        if every_rank is not None and len(every_rank) > 1:  # dropout streams of every rank, for an exact resume
            state["rng_torch_ranks"] = [r for r, _ in every_rank]
            state["rng_device_ranks"] = [d for _, d in every_rank]
        if self.self_teacher is not None:
            state["self_teacher"] = self.self_teacher.state_dict()
        if self.nets.teacher is not None:
            state["teacher"] = self.nets.teacher.state_dict()
        return state

    def load_state_dict(self, state, source, dev, world):
        """Restore from a checkpoint dict read from ``source`` (named in errors)."""
        self.samples, self.phase = state["samples"], state["phase"]
        self.student.load_state_dict(state["student"])
        self.optimizer.load_state_dict(state["optimizer"])
        tracked = _tracked_inference_emas(state, self.own_setting.label)
        for setting, ema in self.inference.items():
            if setting.label not in tracked:
                raise ConfigError(f"{source} holds no inference EMA with {setting.label} (only {', '.join(sorted(tracked))}): "
                                  f"add {setting.setting} to train.extra_inference_emas of the run that wrote it")
            ema.load_state_dict(tracked[setting.label])
        if self.self_teacher is not None:
            self.self_teacher.load_state_dict(state["self_teacher"])
        if self.nets.teacher is not None:
            self.nets.teacher.load_state_dict(state["teacher"])
        _restore_global_rng(state, dev, world, self.seed)
        self.generator.set_state(state["rng_method"])


def inference_emas(own, extras, student, phase, batch_size):
    """{InferenceEMA: EMA}: the run's own μ_I setting ``own`` and each of ``extras`` (``train.extra_inference_emas``)."""
    return {setting: EMA(student, setting.for_phase(phase, batch_size)) for setting in (own, *extras)}


def _tracked_inference_emas(state, own):
    """{label: EMA state} of the inference EMAs in a checkpoint (one written before labels holds only its own)."""
    tracked = {state.get("inference_ema_label", own): state["inference_ema"]}
    tracked.update({e["label"]: e["ema"] for e in state.get("extra_inference_emas", [])})
    return tracked


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
