"""Write dvc.yaml from experiments/*.yaml and params.yaml: the digits-scale and the paper-scale pipelines.

    python -m tract_repro.results.pipeline          # regenerate dvc.yaml after editing experiments/ or params.yaml

Digits scale (``digits_*``): digits_classifier → digits_teacher → one stage per shared phase
(all seeds, run as parallel one-thread jobs) → one evaluation stage per evaluated phase →
digits_<table>.

Paper scale (params.yaml ``paper:``): paper_check_<setup> (data, teacher, Inception and reference
sources present, else one line) → paper_fid_ref_<setup> (reference statistics) and
paper_import_<name> (an imported teacher, for the teacher rows) → paper_run_<phase> (one stage per
shared phase, ``python -m tract_repro.launch … --executor ${paper.executor} --wait``) →
paper_eval_<run> (FID, 3 seed ranges) → <table> (the paper-scale column of results/<table>.md).
"""
import sys
from pathlib import Path

import yaml

from tract_repro.results.check import SETUPS
from tract_repro.results.experiments import (
    DIGITS_RUNS, PAPER_RUNS, eval_file, expand, expand_paper, load_run_templates, load_tables, paper_eval_file,
)

CLASSIFIER_DIR = f"{DIGITS_RUNS}/classifier"
CACHE_DIR = f"{DIGITS_RUNS}/cache"
EVAL_DIR = "results/digits/eval"
LAUNCH = "python -m tract_repro.launch"


def quote(binding):
    return '"' + binding.replace('"', '\\"') + '"'


def gin_deps(gin_file, root="gin"):
    """A gin file and, recursively, the files it includes (include paths are relative to gin/)."""
    found, todo = [], [gin_file]
    while todo:
        current = todo.pop(0)
        if current in found or not Path(current).is_file():
            continue
        found.append(current)
        for line in Path(current).read_text().splitlines():
            if line.strip().startswith("include "):
                todo.append(f"{root}/{line.split(None, 1)[1].strip().strip(chr(39)).strip(chr(34))}")
    return found


def run_dir(name):
    return f"{DIGITS_RUNS}/{name}"


def teacher_stage(name, template):
    return dict(cmd=f"{LAUNCH} {template['gin']} --gin \"TOTAL = '${{digits.teacher_total}}'\" --executor local "
                    f"--workdir {run_dir(name)}",
                deps=gin_deps(template["gin"]), params=["digits.teacher_total"], outs=[run_dir(name)])


def phase_stage(phase):
    args = [LAUNCH, phase.gin, *[f"--gin {quote(b)}" for b in phase.stage_bindings()],
            f"--gin {quote(f'TEACHER = {run_dir(phase.teacher)!r}')}", f"--gin {quote(f'train.only_phase = {phase.index}')}"]
    deps = gin_deps(phase.gin)
    if phase.previous is not None:
        args.append(f"--gin {quote(f'train.previous = {chr(39)}{phase.previous.workdir}/s{{seed}}{chr(39)}')}")
        deps.append(phase.previous.workdir)
    else:
        deps.append(run_dir(phase.teacher))
    seeds = " ".join(map(str, sorted(phase.seeds)))
    args += [f"--seeds {seeds}", "--parallel ${digits.parallel}", f"--workdir {phase.workdir}/s{{seed}}"]
    return dict(cmd=" ".join(args), deps=deps, params=["digits.parallel"], outs=[phase.workdir])


def eval_stage(target, teacher, is_teacher, requests):
    """Evaluate one run (all its seeds) for every (sampler, steps) its rows ask for: one process per
    (sampler, steps), evaluating every seed (start-up, classifier and teacher reference paid once)."""
    groups = {}
    for (sampler, seed), steps in sorted(requests.items()):
        groups.setdefault((sampler, tuple(sorted(steps, reverse=True))), []).append(seed)
    cmds, metrics, pngs = [], [], []
    for (sampler, steps), seeds in sorted(groups.items()):
        runs = [run_dir(target) if is_teacher else f"{run_dir(target)}/s{seed}" for seed in seeds]
        outs = [eval_file(dict(target=target, sampler=sampler), seed) for seed in seeds]
        chosen = "" if sampler == "ddim" else f" --sampler {sampler}"
        cmds.append(f"python -m tract_repro.evaluate {' '.join(runs)} --steps {' '.join(map(str, steps))}{chosen} "
                    f"--samples ${{digits.eval_samples}} --reference-steps ${{digits.reference_steps}} --threads ${{digits.eval_threads}} "
                    f"--classifier {CLASSIFIER_DIR} --cache {CACHE_DIR} --out {' '.join(outs)}")
        metrics += [{out: {"cache": False}} for out in outs]
        pngs += [{out.replace(".json", f"_{k}steps.png"): {"cache": False}} for out in outs for k in steps]
    deps = sorted({run_dir(target), CLASSIFIER_DIR, run_dir(teacher)})
    return dict(cmd=cmds, deps=deps,
                params=["digits.eval_samples", "digits.reference_steps", "digits.eval_threads"], metrics=metrics, outs=pngs)


def build(tables, templates, params, paper=None):
    """The pipeline: the digits stages from ``params`` (params.yaml's digits section), then, given ``paper``
    (its paper section), the paper-scale stages."""
    pipeline = build_digits(tables, templates, params)
    if paper is not None:
        pipeline["stages"].update(build_paper(tables, paper, digits_tables={
            name[len("digits_"):] for name in pipeline["stages"] if name[len("digits_"):] in tables}))
    return pipeline


def build_digits(tables, templates, params):
    phases, evaluations = expand(tables, templates, params)
    stages = {"digits_classifier": dict(
        cmd=f"python -m tract_repro.evaluation.classifier --workdir {CLASSIFIER_DIR} "
            f"--gin \"train_classifier.epochs = ${{digits.classifier_epochs}}\"",
        params=["digits.classifier_epochs"], outs=[CLASSIFIER_DIR])}
    used_teachers = {e["teacher"] for e in evaluations}
    for name, template in templates.items():
        if template.get("teacher") is None and name in used_teachers:
            stages[f"digits_{name}"] = teacher_stage(name, template)
    for key in sorted(phases):
        stages[f"digits_run_{key}"] = phase_stage(phases[key])
    wanted = {}
    for e in evaluations:
        entry = wanted.setdefault(e["target"], dict(teacher=e["teacher"], requests={}))
        for seed in e["seeds"]:
            entry["requests"].setdefault((e["sampler"], seed), set()).add(e["steps"])
    for target in sorted(wanted):
        entry = wanted[target]
        stages[f"digits_eval_{target}"] = eval_stage(target, entry["teacher"], target == entry["teacher"], entry["requests"])
    for name in tables:
        rows = [e for e in evaluations if e["table"] == name]
        if not rows:
            continue
        deps = sorted({eval_file(e, s) for e in rows for s in e["seeds"]})
        runs = sorted({f"{run_dir(e['target'])}/s{s}" for e in rows if e["target"] != e["teacher"] for s in e["seeds"]})
        stages[f"digits_{name}"] = dict(
            cmd=f"python -m tract_repro.results.tables {name}", deps=[f"experiments/{name}.yaml", *deps, *runs],
            metrics=[{f"results/digits/{name}.json": {"cache": False}}],
            outs=[{f"results/{name}.md": {"cache": False}}, {f"results/digits/{name}.png": {"cache": False}},
                  {f"results/digits/{name}_curves.png": {"cache": False}}],
            plots=[{f"results/digits/{name}.csv": {"cache": False, "x": "nfe", "y": "digits_fd", "template": "scatter"}},
                   {f"results/digits/{name}_curves.csv": {"cache": False, "x": "samples", "y": "loss", "template": "scatter"}}])
    return {"stages": stages}


# ------------------------------------------------------------------------------------ paper scale

CHECKS = f"{PAPER_RUNS}/checks"
FID_REF = f"{PAPER_RUNS}/fid_ref"


def check_stage(setup):
    dataset = SETUPS[setup][0]
    out = f"{CHECKS}/{setup}"
    return dict(cmd=f"python -m tract_repro.results.check {setup} --data ${{paper.data.{dataset}}} "
                    f"--teacher ${{paper.teachers.{setup}}} --inception ${{paper.inception}} "
                    f"--mode ${{paper.fid.mode}} --executor ${{paper.executor}} --cluster ${{paper.cluster}} --out {out}",
                params=[f"paper.data.{dataset}", f"paper.teachers.{setup}", "paper.inception", "paper.fid.mode",
                        "paper.executor", "paper.cluster"],
                outs=[{f"{out}/data.json": {"cache": False}}, {f"{out}/teacher.json": {"cache": False}}],
                always_changed=True)


def reference_stage(setup):
    """Reference statistics for a setup's dataset (CIFAR-10: clean-fid's file; ImageNet64: our loader, on a GPU)."""
    dataset = SETUPS[setup][0]
    out = f"{FID_REF}/{setup}.npz"
    if dataset == "cifar10":
        cmd = f"python -m tract_repro.evaluation.fid reference cifar10 --mode ${{paper.fid.mode}} --out {out}"
        params = ["paper.fid.mode"]
    else:
        cmd = (f"python -m tract_repro.evaluation.fid reference {dataset} --root ${{paper.data.{dataset}}} "
               f"--mode ${{paper.fid.mode}} --inception ${{paper.inception}} --batch ${{paper.fid.batch}} "
               f"--cache {PAPER_RUNS}/cache --executor ${{paper.executor}} --cluster ${{paper.cluster}} --out {out}")
        params = [f"paper.data.{dataset}", "paper.fid.mode", "paper.fid.batch", "paper.inception", "paper.executor",
                  "paper.cluster"]
    return dict(cmd=cmd, deps=[f"{CHECKS}/{setup}/data.json"], params=params, outs=[out])


def setup_bindings(setup):
    """The --gin bindings that point a paper run at the params' data and teacher paths."""
    dataset = SETUPS[setup][0]
    return [f"--gin {quote(f'TEACHER = {chr(39)}${{paper.teachers.{setup}}}{chr(39)}')}",
            f"--gin {quote(f'DATA = {chr(39)}${{paper.data.{dataset}}}{chr(39)}')}"], \
        [f"paper.data.{dataset}", f"paper.teachers.{setup}"]


def teacher_import_stage(name, spec):
    paths, params = setup_bindings(spec["setup"])
    args = ["python -m tract_repro.import_teacher", spec["gin"], *[f"--gin {quote(b)}" for b in spec["bindings"]],
            *paths, f"--workdir {PAPER_RUNS}/{name}"]
    return dict(cmd=" ".join(args), deps=[*gin_deps(spec["gin"]), f"{CHECKS}/{spec['setup']}/teacher.json"],
                params=params, outs=[{f"{PAPER_RUNS}/{name}": {"cache": False}}])


def paper_phase_stage(phase):
    paths, params = setup_bindings(phase.setup)
    args = [LAUNCH, "${paper.cluster}", phase.gin, *[f"--gin {quote(b)}" for b in phase.stage_bindings()], *paths,
            f"--gin {quote(f'train.only_phase = {phase.index}')}"]
    deps = gin_deps(phase.gin)
    if phase.previous is not None:
        args.append(f"--gin {quote(f'train.previous = {phase.previous.workdir!r}')}")
        deps.append(phase.previous.workdir)
    else:
        deps += [f"{CHECKS}/{phase.setup}/data.json", f"{CHECKS}/{phase.setup}/teacher.json"]
    args += ["--executor ${paper.executor} --wait", f"--workdir {phase.workdir}"]
    # persist: a phase interrupted on the cluster resumes from its checkpoints when the stage runs again
    return dict(cmd=" ".join(args), deps=deps, params=[*params, "paper.executor", "paper.cluster"],
                outs=[{phase.workdir: {"cache": False, "persist": True}}])


def paper_eval_stage(target, setup, requests):
    """FID of one run for every (sampler, steps) its rows ask for: 3 seed ranges per step count."""
    cmds, metrics, pngs = [], [], []
    for sampler, steps in sorted(requests.items()):
        out = paper_eval_file(dict(target=target, sampler=sampler))
        steps = sorted(steps, reverse=True)
        chosen = "" if sampler == "ddim" else f" --sampler {sampler}"
        cmds.append(f"python -m tract_repro.evaluation.fid evaluate {PAPER_RUNS}/{target} --steps "
                    f"{' '.join(map(str, steps))}{chosen} --reference {FID_REF}/{setup}.npz ${{paper.fid}} "
                    f"--inception ${{paper.inception}} --executor ${{paper.executor}} --cluster ${{paper.cluster}} "
                    f"--out {out}")
        metrics.append({out: {"cache": False}})
        pngs += [{out.replace(".json", f"_{k}steps.png"): {"cache": False}} for k in steps]
    return dict(cmd=cmds if len(cmds) > 1 else cmds[0], deps=[f"{PAPER_RUNS}/{target}", f"{FID_REF}/{setup}.npz"],
                params=["paper.fid", "paper.inception", "paper.executor", "paper.cluster"], metrics=metrics, outs=pngs)


def build_paper(tables, paper, digits_tables=()):
    """The paper-scale stages; ``digits_tables`` own results/<table>.md (the paper stage then updates it in place)."""
    for key in ("executor", "cluster", "inception", "data", "teachers", "fid"):
        if key not in paper:
            raise ValueError(f"params.yaml's paper section has no {key!r}")
    phases, teachers, evaluations = expand_paper(tables)
    setups = sorted({e["setup"] for e in evaluations})
    stages = {}
    for setup in setups:
        stages[f"paper_check_{setup}"] = check_stage(setup)
    for setup in setups:
        stages[f"paper_fid_ref_{setup}"] = reference_stage(setup)
    for name in sorted(teachers):
        stages[f"paper_import_{name}"] = teacher_import_stage(name, teachers[name])
    for key in sorted(phases):
        stages[f"paper_run_{key}"] = paper_phase_stage(phases[key])
    wanted = {}
    for e in evaluations:
        entry = wanted.setdefault(e["target"], dict(setup=e["setup"], requests={}))
        entry["requests"].setdefault(e["sampler"], set()).add(e["steps"])
    for target in sorted(wanted):
        stages[f"paper_eval_{target}"] = paper_eval_stage(target, wanted[target]["setup"], wanted[target]["requests"])
    for name in tables:
        rows = [e for e in evaluations if e["table"] == name]
        if not rows:
            continue
        stage = dict(cmd=f"python -m tract_repro.results.tables {name} --paper-scale",
                     deps=[f"experiments/{name}.yaml", *sorted({paper_eval_file(e) for e in rows})],
                     metrics=[{f"results/paper/{name}.json": {"cache": False}}])
        if name not in digits_tables:  # no digits stage writes this table's Markdown
            stage["outs"] = [{f"results/{name}.md": {"cache": False}}]
        stages[name] = stage
    return stages


def main(argv=None):
    try:
        all_params = yaml.safe_load(Path("params.yaml").read_text())
        params = all_params["digits"]
        pipeline = build(load_tables(), load_run_templates(), params, all_params.get("paper"))
    except (ValueError, KeyError, OSError) as exc:
        print(f"error: {str(exc).strip().splitlines()[0]}", file=sys.stderr)
        return 2
    header = ("# Generated by `python -m tract_repro.results.pipeline` from experiments/*.yaml and params.yaml.\n"
              "# Edit those, then regenerate; tests/test_pipeline.py checks this file is current.\n")
    Path("dvc.yaml").write_text(header + yaml.safe_dump(pipeline, sort_keys=False, width=1000, allow_unicode=True))
    print(f"dvc.yaml: {len(pipeline['stages'])} stages")
    return 0


if __name__ == "__main__":
    sys.exit(main())
