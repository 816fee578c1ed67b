"""Write dvc.yaml from experiments/*.yaml and params.yaml (the digits-scale pipeline).

    python -m tract_repro.results.pipeline          # regenerate dvc.yaml after editing experiments/ or params.yaml

Stages: digits_classifier → digits_teacher → one stage per shared phase (all seeds, run as
parallel one-thread jobs) → one evaluation stage per evaluated phase → digits_<table>.
"""
import sys
from pathlib import Path

import yaml

from tract_repro.results.experiments import DIGITS_RUNS, eval_file, expand, load_run_templates, load_tables

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
    return dict(cmd=f"{LAUNCH} {template['gin']} --gin \"TOTAL = '${{digits.teacher_total}}'\" --workdir {run_dir(name)}",
                deps=gin_deps(template["gin"]), params=["digits.teacher_total"], outs=[run_dir(name)])


def phase_stage(phase):
    args = [LAUNCH, phase.gin, *[f"--gin {quote(b)}" for b in phase.bindings],
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
    """Evaluate one run (all its seeds) for every (sampler, steps) its rows ask for."""
    cmds, metrics, pngs = [], [], []
    for (sampler, seed), steps in sorted(requests.items()):
        run = run_dir(target) if is_teacher else f"{run_dir(target)}/s{seed}"
        out = eval_file(dict(target=target, sampler=sampler), seed)
        steps = sorted(steps, reverse=True)
        chosen = "" if sampler == "ddim" else f" --sampler {sampler}"
        cmds.append(f"python -m tract_repro.evaluate {run} --steps {' '.join(map(str, steps))}{chosen} "
                    f"--samples ${{digits.eval_samples}} --reference-steps ${{digits.reference_steps}} --threads ${{digits.eval_threads}} "
                    f"--classifier {CLASSIFIER_DIR} --cache {CACHE_DIR} --out {out}")
        metrics.append({out: {"cache": False}})
        pngs += [{out.replace(".json", f"_{k}steps.png"): {"cache": False}} for k in steps]
    deps = sorted({run_dir(target), CLASSIFIER_DIR, run_dir(teacher)})
    return dict(cmd=cmds, deps=deps, params=["digits.eval_samples", "digits.reference_steps", "digits.eval_threads"], metrics=metrics, outs=pngs)


def build(tables, templates, params):
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


def main(argv=None):
    try:
        params = yaml.safe_load(Path("params.yaml").read_text())["digits"]
        pipeline = build(load_tables(), load_run_templates(), params)
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
