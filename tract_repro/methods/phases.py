"""Step schedules S = (S₀ > S₁ > … > S_P) and their phases in samples (method-spec §4-5)."""
from dataclasses import dataclass

from tract_repro.common.errors import ConfigError
from tract_repro.common.lengths import parse_samples


def check_schedule(steps, T):
    """Validate a step schedule against the fine grid of T steps; return it as a tuple of ints."""
    try:
        S = tuple(int(s) for s in steps)
    except (TypeError, ValueError):
        raise ConfigError(f"step schedule {steps!r} must be a sequence of integers like (1024, 32, 1)") from None
    if len(S) < 2:
        raise ConfigError(f"step schedule {S} needs at least two entries, e.g. (1024, 32, 1)")
    if any(s < 1 for s in S):
        raise ConfigError(f"step schedule {S} must hold positive step counts")
    if any(a <= b for a, b in zip(S, S[1:])):
        raise ConfigError(f"step schedule {S} must be strictly decreasing, e.g. (1024, 32, 1)")
    for s in S:
        if T % s:
            raise ConfigError(f"step schedule {S}: {s} does not divide T = {T}; use step counts that divide T")
    for a, b in zip(S, S[1:]):
        if a % b:
            raise ConfigError(f"step schedule {S}: {b} does not divide {a}; each phase must group whole teacher steps")
    return S


@dataclass(frozen=True)
class Phase:
    """Phase p trains on samples [start, end): the teacher runs S_p steps, the student learns S_{p+1}."""

    index: int
    start: int
    end: int
    teacher_steps: int | None
    student_steps: int

    @property
    def length(self):
        return self.end - self.start


def plan_phases(steps, total=None, per_phase=None):
    """Phases of a schedule: ``total`` split evenly, or lengths given ``per_phase`` (paper Tables 5, 6)."""
    P = len(steps) - 1
    if (total is None) == (per_phase is None):
        raise ConfigError("give exactly one of train.total (split evenly over phases) or train.phase_lengths")
    if per_phase is not None:
        if isinstance(per_phase, (int, str)):
            per_phase = [per_phase] * P
        lengths = [parse_samples(n) for n in per_phase]
        if len(lengths) != P:
            raise ConfigError(f"train.phase_lengths has {len(lengths)} entries but the schedule {tuple(steps)} has {P} phases")
    else:
        total = parse_samples(total)
        lengths = [(p + 1) * total // P - p * total // P for p in range(P)]
    if any(n <= 0 for n in lengths):
        raise ConfigError(f"every phase needs a positive length, got {lengths}")
    phases, start = [], 0
    for p, n in enumerate(lengths):
        phases.append(Phase(p, start, start + n, steps[p], steps[p + 1]))
        start += n
    return phases


def phase_at(phases, samples):
    """The phase a step belongs to, by the sample count at its start."""
    for phase in phases:
        if samples < phase.end:
            return phase
    return phases[-1]
