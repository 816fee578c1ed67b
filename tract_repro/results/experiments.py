"""Load experiments/*.yaml and expand digits-scale rows into shared, per-phase runs.

A phase is identified by everything that determines its computation: the run template,
the bindings other than schedule and lengths, the schedule up to its student, the phase
lengths up to it, and T.  Rows whose runs agree on a prefix of phases share those phases.
The first phase of a multi-phase run is trained the same whatever μ_I (the inference EMA only
matters from the first phase boundary on): rows that differ in μ_I alone share it, and it tracks
the inference EMA of each of their μ_I (``train.extra_inference_emas``).
"""
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from tract_repro.common.errors import ConfigError
from tract_repro.common.files import write_text

# The engine (gin configurables, torch) is imported inside the functions that parse run configs, so
# that reading experiments and evaluations (tables.py, a stage of every table) starts without torch.

EXPERIMENTS = Path("experiments")
EVALUATIONS = "pipelines/evaluations.json"  # what each table row evaluates: written with dvc.yaml, read by table stages
DIGITS_RUNS = "runs/digits"
LENGTH_MACROS = ("SCHEDULE", "TOTAL", "PHASE_LENGTH", "START_STEPS", "FINAL_STEPS")
LAST_PHASE_MACROS = ("STOCHASTIC",)  # change only a run's last phase: the phases before it are shared with runs without them
MU_I_KEYS = ("INFERENCE_EMA", "inference_ema_momentum.momentum", "inference_ema_momentum.residual")


def binding_name(line):
    """'inference_ema_momentum.residual' of 'inference_ema_momentum.residual = 1e-3'."""
    return line.split("=")[0].strip()


def load_yaml(path):
    """A YAML file's content, by libyaml's C parser where PyYAML has it (10× faster)."""
    return yaml.load(Path(path).read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


def load_tables(root=EXPERIMENTS):
    """{table name: definition} for every experiments/<table>.yaml except runs.yaml."""
    return {p.stem: load_yaml(p) for p in sorted(Path(root).glob("*.yaml")) if p.stem != "runs"}


def load_run_templates(root=EXPERIMENTS):
    return load_yaml(Path(root) / "runs.yaml")


def write_evaluations(evaluations, root="."):
    """Save {scale: {table: {row: evaluation}}} to EVALUATIONS (the pipeline generator does, beside dvc.yaml)."""
    path = Path(root) / EVALUATIONS
    write_text(path, json.dumps(evaluations, indent=1, sort_keys=True) + "\n")


def read_evaluations(scale, root="."):
    """{table: {row: evaluation}} at ``scale`` ('digits' or 'paper'), as the pipeline generator expanded them."""
    path = Path(root) / EVALUATIONS
    if not path.is_file():
        raise ConfigError(f"{path} is missing: write it with `python -m tract_repro.results.pipeline`")
    return json.loads(path.read_text()).get(scale, {})


def resolve(value, params):
    """A binding value as gin text; '$name' takes digits params[name] as a quoted string."""
    if isinstance(value, str) and value.startswith("$"):
        key = value[1:]
        if key not in params:
            raise ConfigError(f"experiments refer to ${key}, which params.yaml's digits section does not define")
        return repr(str(params[key]))
    return str(value)


@dataclass
class Phase:
    """One phase of a run, trained by one DVC stage for all its seeds."""

    key: str
    run: str
    gin: str
    bindings: list
    index: int
    previous: "Phase | None"
    student_steps: int
    teacher: str = "teacher"
    seeds: set = field(default_factory=set)
    ema_settings: set = field(default_factory=set)  # a first phase shared across μ_I: every μ_I (InferenceEMA) it tracks

    @property
    def workdir(self):
        return f"{DIGITS_RUNS}/{self.key}"

    def stage_bindings(self):
        """The bindings its stage runs with; a first phase shared across μ_I runs the first (sorted) of its
        μ_I settings and tracks the others as ``train.extra_inference_emas``."""
        if not self.ema_settings:
            return list(self.bindings)
        main, *others = sorted(self.ema_settings, key=lambda s: s.label)
        extras = [s.setting for s in others]
        return ([b for b in self.bindings if binding_name(b) not in MU_I_KEYS]
                + [f"inference_ema_momentum.{k} = {v}" for k, v in dict(momentum=main.momentum,
                                                                         residual=main.residual).items()]
                + ([f"train.extra_inference_emas = {extras}"] if extras else []))


def describe_run(gin_file, bindings):
    """(schedule, phase lengths, effective config, μ_I setting) of a run, computed by the engine from its gin config.

    The effective config is gin's resolved configuration without the macros that only shape
    the phases (those are represented by the schedule and lengths themselves).
    """
    from tract_repro import config
    from tract_repro.config.runs import resolved_options
    from tract_repro.methods.phases import plan_phases

    text = config.parse([gin_file], bindings)
    o = resolved_options().require("method", "inference_ema")
    steps = o.method.steps(o.T)
    phases = plan_phases(steps, o.total, o.phase_lengths)
    batch = o.batch_size
    if any(p.length < batch for p in phases):
        raise ConfigError(f"{gin_file} with {bindings}: phases of {[p.length for p in phases]} samples are shorter "
                         f"than one batch ({batch}); raise the budget in params.yaml")
    effective, dropped = [], False
    for line in text.splitlines():
        if line[:1].isspace() and dropped:  # the continuation of a long length binding, as gin wraps it
            continue
        dropped = binding_name(line) in LENGTH_MACROS
        if line.strip() and not line.startswith("#") and not dropped:
            effective.append(line)
    return steps, [p.length for p in phases], effective, o.inference_ema


def chain_phases(phases, new_phase, run, described, last):
    """Find or add (``new_phase(key, k, previous, student_steps)``) phases 0..last of a run; return the last.

    ``described`` is :func:`describe_run`'s answer.  Phase 0 of a run that goes on to further phases
    leaves μ_I out of its key and records the run's μ_I among those it tracks.
    """
    steps, lengths, effective, ema_setting = described
    previous = None
    for k in range(last + 1):
        shared = k == 0 and last > 0
        identity = [line for line in effective if binding_name(line) not in MU_I_KEYS] if shared else effective
        if k < len(lengths) - 1:
            identity = [line for line in identity if binding_name(line) not in LAST_PHASE_MACROS]
        key = phase_key(run, identity, steps, lengths, k)
        if key not in phases:
            phases[key] = new_phase(key, k, previous, steps[k + 1])
        if shared:
            phases[key].ema_settings.add(ema_setting)
        previous = phases[key]
    return previous


def phase_key(run, effective, steps, lengths, k):
    """A readable, unique name for phase k: run, schedule to its student, its length, a hash of the rest."""
    identity = json.dumps([run, effective, list(steps[:k + 2]), lengths[:k + 1]])
    digest = hashlib.sha256(identity.encode()).hexdigest()[:6]
    return f"{run}_{'-'.join(map(str, steps[:k + 2]))}_n{lengths[k]}_{digest}"


def sampler_of(spec):
    """The sampler a row is evaluated with (``sampler:`` in its experiments file, DDIM by default), checked
    against the registry so that a misspelt one fails when the pipeline is written, in one line."""
    from tract_repro.sampling import registry

    return registry.get(spec.get("sampler", "ddim")).name


def trained_once(template):
    """Whether a run template is trained once, by its own stage (a teacher, or a run marked ``once``: guided
    distillation's stage 1, the teacher of stage 2), rather than per seed and phase."""
    return template.get("teacher") is None or bool(template.get("once"))


def teachers_of(name, templates):
    """The runs a run stands on: its teacher, its teacher's teacher, …"""
    chain = []
    while templates[name].get("teacher") is not None:
        name = templates[name]["teacher"]
        chain.append(name)
    return chain


def guidance_weights(spec, table):
    """The guidance weights w a row is evaluated at (the row's ``w``, else its table's ``digits.w``), or [None]."""
    ws = spec.get("w", (table.get("digits") or {}).get("w"))
    if ws is None:
        return [None]
    if not isinstance(ws, list) or not ws or not all(isinstance(w, (int, float)) and not isinstance(w, bool) for w in ws):
        raise ConfigError(f"experiments/{table['table']}.yaml: w = {ws!r}: give a list of guidance weights, e.g. [0, 1, 4]")
    return [float(w) for w in ws]


def expand(tables, templates, params):
    """(phases by key, evaluations) for every digits row.

    Each evaluation names its ``target`` (a phase key, or a run trained once for teacher rows), the
    teacher run it distils, its sampler, step count and guidance weight w (None without guidance), and
    its seeds.  A row evaluated at several w becomes one evaluation per w, named ``<row>@w<w>``.
    """
    phases, evaluations = {}, []
    for name, table in tables.items():
        seeds = table.get("digits", {}).get("seeds") or []
        for row in table["rows"]:
            spec = row.get("digits")
            if not spec or not seeds:
                continue
            template = templates[spec["run"]]
            for w in guidance_weights(spec, table):
                row_id = row["id"] if w is None else f"{row['id']}@w{w:g}"
                common = dict(table=name, row=row_id, steps=spec["steps"], sampler=sampler_of(spec),
                              **({} if w is None else dict(w=w)))
                if trained_once(template):  # a teacher (or a stage-1 student): trained once, evaluated once
                    evaluations.append(dict(common, target=spec["run"], teacher=spec["run"], seeds=[0]))
                else:
                    evaluations.append(dict(common, teacher=template["teacher"], seeds=list(seeds)))
            if trained_once(template):
                continue
            bindings = [f"{k} = {resolve(v, params)}" for k, v in sorted(spec.get("bindings", {}).items())]
            described = describe_run(template["gin"], bindings)
            last = spec.get("phase", len(described[1]) - 1)
            previous = chain_phases(phases, lambda key, k, before, student: Phase(
                key, spec["run"], template["gin"], bindings, k, before, student, template["teacher"]), spec["run"], described, last)
            for phase in _chain(previous):
                phase.seeds.update(seeds)
            for evaluation in evaluations:
                evaluation.setdefault("target", previous.key)
    return phases, evaluations


def _chain(phase):
    """A phase and the phases before it."""
    while phase is not None:
        yield phase
        phase = phase.previous


def eval_file(evaluation, seed, root="results/digits/eval"):
    """Where an evaluation's metrics for one seed live (other samplers and each guidance weight get their own file)."""
    suffix = "" if evaluation["sampler"] == "ddim" else f"_{evaluation['sampler']}"
    if evaluation.get("w") is not None:
        suffix += f"_w{evaluation['w']:g}"
    return f"{root}/{evaluation['target']}/s{seed}{suffix}.json"


# ------------------------------------------------------------------------------------ paper scale

PAPER_RUNS = "runs/paper"
PAPER_EVAL = "results/paper/eval"


@dataclass
class PaperPhase(Phase):
    """One phase of a paper-scale run: one training seed, one DVC stage, under runs/paper/."""

    setup: str = ""

    @property
    def workdir(self):
        return f"{PAPER_RUNS}/{self.key}"


def setup_of_parsed():
    """The setup of the gin config just parsed: its dataset and teacher family, e.g. 'cifar10_pd'."""
    from tract_repro import config

    dataset = config.query("train.dataset")
    scoped = getattr(dataset, "scoped_selector", "")
    if "/" in scoped:  # a gin scope names a latent setup: train.dataset = @sd15/latents
        return scoped.split("/")[0]
    name = getattr(dataset, "selector", str(dataset)).split(".")[-1]
    if config.query("UNet.null_class"):  # guided distillation: a teacher the pipeline trains with label dropout
        return f"{name}_guided"
    family = "edm" if config.query("train.parameterisation") == "edm" else "pd"
    return f"{name}_{family}"


def paper_bindings(spec):
    """A paper-scale row's bindings as gin lines; paper scale has literal values, no params symbols."""
    bindings = []
    for k, v in sorted((spec.get("bindings") or {}).items()):
        if isinstance(v, str) and v.startswith("$"):
            raise ConfigError(f"paper-scale binding {k} = {v}: params symbols are for digits scale; write the value")
        bindings.append(f"{k} = {v}")
    return bindings


def expand_paper(tables):
    """(phases by key, teacher imports or trainings by name, evaluations) for every row with a ``paper_scale`` run.

    Phases are shared between rows and tables exactly as at digits scale.  A row whose gin file trains no
    student (a teacher, e.g. gin/cifar10_teacher.gin) evaluates the imported teacher checkpoint.  A table's
    ``paper_runs`` are runs the pipeline trains once (guided distillation's teacher and stage 1): a row
    evaluates one with ``run:``, and a row's phases start from one with ``teacher_run:``.  A row evaluated at
    several guidance weights (its ``w``, else its table's ``paper.w``) becomes one evaluation per w.
    """
    from tract_repro import config

    phases, teachers, evaluations = {}, {}, []
    for name, table in tables.items():
        trained = table.get("paper_runs") or {}
        for row in table["rows"]:
            spec = row.get("paper_scale")
            if not spec:
                continue
            ws = guidance_weights(spec, dict(table, digits=table.get("paper") or {}))
            if spec.get("run"):
                if spec["run"] not in trained:
                    raise ConfigError(f"experiments/{name}.yaml row {row['id']}: run {spec['run']!r} is not in its "
                                      f"paper_runs: add it there")
                run = spec["run"]
                _add_trained(teachers, run, trained, name)
                evaluations += [dict(table=name, row=_row_id(row, w), steps=spec["steps"], sampler=sampler_of(spec),
                                     setup=teachers[run]["setup"], target=run, **_w(w)) for w in ws]
                continue
            gin_file, bindings = spec["gin"], paper_bindings(spec)
            config.parse([gin_file], bindings)
            setup, needs_teacher = setup_of_parsed(), config.build("train.method").needs_teacher
            common = dict(table=name, steps=spec["steps"], sampler=sampler_of(spec), setup=setup)
            run = Path(gin_file).stem
            if not needs_teacher:
                teachers[run] = dict(gin=gin_file, bindings=bindings, setup=setup)
                evaluations += [dict(common, row=_row_id(row, w), target=run, **_w(w)) for w in ws]
                continue
            teacher_run = spec.get("teacher_run")
            if teacher_run is not None:
                _add_trained(teachers, teacher_run, trained, name)
            described = describe_run(gin_file, bindings)
            last = spec.get("phase", len(described[1]) - 1)
            previous = chain_phases(phases, lambda key, k, before, student: PaperPhase(
                key, run, gin_file, bindings, k, before, student, teacher_run, {0}, setup=setup), run, described, last)
            evaluations += [dict(common, row=_row_id(row, w), target=previous.key, **_w(w)) for w in ws]
    return phases, teachers, evaluations


def _row_id(row, w):
    return row["id"] if w is None else f"{row['id']}@w{w:g}"


def _w(w):
    return {} if w is None else dict(w=w)


def _add_trained(teachers, run, trained, table):
    """Register a paper run the pipeline trains once, and the runs it stands on, in ``teachers``."""
    from tract_repro import config

    for r in _trained_chain(run, trained, table):
        config.parse([trained[r]["gin"]], paper_bindings(trained[r]))
        teachers[r] = dict(gin=trained[r]["gin"], bindings=paper_bindings(trained[r]), setup=setup_of_parsed(),
                           trains=True, teacher_run=trained[r].get("teacher_run"))


def _trained_chain(run, trained, table):
    """A paper run trained once and the runs it stands on (its teacher_run, …), first first."""
    chain = []
    while run is not None:
        if run not in trained:
            raise ConfigError(f"experiments/{table}.yaml: teacher_run {run!r} is not in its paper_runs: add it there")
        chain.insert(0, run)
        run = trained[run].get("teacher_run")
    return chain


def paper_eval_file(evaluation, root=PAPER_EVAL):
    """Where a paper-scale evaluation's metrics live (one file per target, sampler and guidance weight)."""
    suffix = "" if evaluation["sampler"] == "ddim" else f"_{evaluation['sampler']}"
    if evaluation.get("w") is not None:
        suffix += f"_w{evaluation['w']:g}"
    return f"{root}/{evaluation['target']}/metrics{suffix}.json"
