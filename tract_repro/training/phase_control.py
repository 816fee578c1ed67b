"""Phase boundaries of a run (method-spec §5): which phase a step is in, and what changes between phases.

At a boundary the teacher becomes the inference EMA, every μ_I is set for the new phase's length,
and the optional resets of ``train.phase_reset`` apply; by default the student, the self-teacher and
Adam carry on.  A run of one phase (``train.only_phase``) spans that phase alone, continuing from
the final checkpoint of the run of the phase before.
"""
import json
from pathlib import Path

from tract_repro.common.errors import ConfigError
from tract_repro.methods.phases import phase_at
from tract_repro.training import checkpoint as ckpt

PHASE_RESETS = {"inference_ema", "self_teacher", "optimizer", "student"}


class PhaseController:
    """Moves a :class:`~tract_repro.training.state.TrainingState` across the phase boundaries of ``phases``."""

    def __init__(self, phases, batch_size, resets=()):
        unknown = set(resets) - PHASE_RESETS
        if unknown:
            raise ConfigError(f"train.phase_reset has unknown entries {sorted(unknown)}: choose from {sorted(PHASE_RESETS)}")
        self.phases, self.batch_size, self.resets = phases, batch_size, set(resets)

    def enter(self, state):
        """The phase of the step starting at ``state.samples``, crossing into it first if it is a new one."""
        phase = phase_at(self.phases, state.samples)
        if phase.index != state.phase:
            state.nets.teacher.load_state_dict(state.inference_ema.module.state_dict())
            state.set_inference_momenta(phase, self.batch_size)
            self._reset(state)
            state.phase = phase.index
        return phase

    def _reset(self, state):
        if "student" in self.resets:
            state.student.load_state_dict(state.nets.teacher.state_dict())
        if "self_teacher" in self.resets and state.self_teacher is not None:
            state.self_teacher.restart()
        if "inference_ema" in self.resets:
            for ema in state.inference.values():
                ema.restart()
        if "optimizer" in self.resets:
            state.optimizer.state.clear()


def span(phases, only_phase=None, previous=None):
    """(start, end) in samples of what a run trains: every phase, or the single phase ``only_phase``."""
    if only_phase is None:
        return 0, phases[-1].end
    if not 0 <= only_phase < len(phases):
        raise ConfigError(f"train.only_phase = {only_phase}, but the schedule has phases 0..{len(phases) - 1}")
    if only_phase > 0 and previous is None:
        raise ConfigError(f"train.only_phase = {only_phase} continues a run: set train.previous to the run of phase {only_phase - 1}")
    return phases[only_phase].start, phases[only_phase].end


def run_info(run_dir):
    """run.json of another run, with a one-line error if it isn't a run directory."""
    path = Path(run_dir) / "run.json"
    if not path.is_file():
        raise ConfigError(f"train.previous = {run_dir} is not a run directory (no run.json): run the previous phase first")
    return json.loads(path.read_text())


def previous_checkpoint(previous, begin, info):
    """The final checkpoint of the previous phase's run, checked to be the same schedule and method."""
    previous = Path(previous)
    first = -(-begin // info["batch_size"]) * info["batch_size"]  # runs step in whole batches: the first step of this phase
    path = ckpt.checkpoint_path(previous / "checkpoints", first)
    if not path.is_file():
        raise ConfigError(f"train.previous = {previous} has no checkpoint at sample {first}: run that phase first")
    theirs, p = run_info(previous), info["only_phase"]
    mine = dict(info, schedule_steps=info["schedule_steps"][:p + 1], phases=info["phases"][:p])
    theirs.update(schedule_steps=theirs["schedule_steps"][:p + 1], phases=theirs["phases"][:p])
    for key in ("method", "schedule_steps", "T", "phases", "batch_size", "seed", "parameterisation"):
        if theirs.get(key) != mine.get(key):  # the phases before this one must be the same computation
            raise ConfigError(f"train.previous = {previous} differs from this run in {key} ({theirs.get(key)!r} vs "
                              f"{mine.get(key)!r}): continue a run of the same configuration")
    return path
