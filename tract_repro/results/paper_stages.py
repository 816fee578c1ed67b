"""The paper-scale stages of dvc.yaml (params.yaml ``paper:``), written by :mod:`tract_repro.results.pipeline`.

paper_check_<setup> (data, teacher, Inception and reference sources present, else one line) →
(latent setups) paper_encode_<setup>_train and, text-to-image, paper_encode_<setup>_prompts (the training shards
and the evaluation captions and images through the model folder's VAE and text encoder, once, resumable) →
paper_fid_ref_<setup> (reference statistics: a text-to-image setup's of its evaluation images, a class-conditional
latent setup's of its training images, as ADM's and DiT's ImageNet references are) and paper_import_<name> (an imported teacher, for the
teacher rows) or paper_train_<name> (a run the pipeline trains once: guided distillation's teacher and
stage 1) → paper_run_<phase> (one stage per shared phase, ``python -m tract_repro.launch … --executor
${paper.executor} --wait``) → paper_eval_<run> (FID and IS, 3 seed ranges, per guidance weight) →
<table> (the paper-scale column of results/<table>.md).
"""
from tract_repro.common.errors import ConfigError
from tract_repro.results.check import LATENT_SETUPS, SETUPS, latent, text_to_image
from tract_repro.results.experiments import PAPER_RUNS, expand_paper, paper_eval_file
from tract_repro.results.stages import EVALUATIONS, LAUNCH, gin_deps, index, quote, w_key

CHECKS = f"{PAPER_RUNS}/checks"
FID_REF = f"{PAPER_RUNS}/fid_ref"
LATENTS = f"{PAPER_RUNS}/latents"
#: sanity_<dataset>: (setup, imported teacher run) whose FID params.yaml's paper.sanity.<dataset> checks
SANITY = {"cifar10": ("cifar10_pd", "cifar10_teacher")}


def latent_parts(setup):
    """What a latent setup encodes: its training shards, and a text-to-image setup's evaluation captions and images."""
    return ("train", "prompts") if text_to_image(setup) else ("train",)


def reference_part(setup):
    """The encoding whose source images a latent setup's FID reference is computed from."""
    return "prompts" if text_to_image(setup) else "train"


def latent_folder(setup, part):
    """Where a latent setup's encoded ``train`` shards or evaluation ``prompts`` live."""
    return f"{LATENTS}/{setup}_{part}"


def prompts_data(setup):
    """The params key of a latent setup's evaluation captions and images (COCO 2014 validation)."""
    return f"paper.data.{LATENT_SETUPS[setup]['prompts_data']}"


def check_stage(setup):
    dataset, teacher = SETUPS[setup][:2]
    out = f"{CHECKS}/{setup}"
    fetched = teacher is not None  # a guided setup's teacher is trained by the pipeline: nothing to fetch
    extra = f"--prompts-data ${{{prompts_data(setup)}}} --clip ${{paper.text_to_image.clip}} " if text_to_image(setup) \
        else ""
    return dict(cmd=f"python -m tract_repro.results.check {setup} --data ${{paper.data.{dataset}}} "
                    + (f"--teacher ${{paper.teachers.{setup}}} " if fetched else "") + extra
                    + f"--inception ${{paper.inception}} "
                    f"--protocol ${{paper.fid.protocol}} --executor ${{paper.executor}} --cluster ${{paper.cluster}} --out {out}",
                params=[f"paper.data.{dataset}", *([f"paper.teachers.{setup}"] if fetched else []),
                        *([prompts_data(setup), "paper.text_to_image.clip"] if text_to_image(setup) else []),
                        "paper.inception",
                        "paper.fid.protocol", "paper.executor", "paper.cluster"],
                outs=[{f"{out}/data.json": {"cache": False}}, {f"{out}/teacher.json": {"cache": False}}],
                always_changed=True)


def encode_stage(setup, part):
    """A latent setup's training shards (``train``) or evaluation captions and images (``prompts``) encoded once by
    the model folder's VAE and text encoder; an interrupted encoding resumes exactly when the stage runs again."""
    source = f"${{paper.data.{SETUPS[setup][0]}}}" if part == "train" else f"${{{prompts_data(setup)}}}"
    out = latent_folder(setup, part)
    classes = LATENT_SETUPS[setup].get("classes")  # all classes, even where the shards lack some
    return dict(cmd=f"python -m tract_repro.encode_latents --model ${{paper.teachers.{setup}}} --source {source} "
                    f"--out {out} --resolution {LATENT_SETUPS[setup]['resolution']} "
                    + (f"--num-classes {classes} " if classes else "")
                    + "${paper.encode} --executor ${paper.executor} --cluster ${paper.cluster}",
                deps=[f"{CHECKS}/{setup}/data.json", f"{CHECKS}/{setup}/teacher.json"],
                params=[f"paper.teachers.{setup}", f"paper.data.{SETUPS[setup][0]}" if part == "train"
                        else prompts_data(setup), "paper.encode", "paper.executor", "paper.cluster"],
                outs=[{out: {"cache": False, "persist": True}}])


def reference_stage(setup):
    """Reference statistics for a setup's dataset (CIFAR-10: clean-fid's file; ImageNet64: our loader, on a GPU;
    a text-to-image latent setup: the evaluation images it encoded; a class-conditional one: all its training
    images, as encoded (centre crop, resized), streamed from their shards)."""
    dataset = SETUPS[setup][0]
    out = f"{FID_REF}/{setup}.npz"
    if latent(setup):
        root = latent_folder(setup, reference_part(setup))
        cmd = (f"python -m tract_repro.evaluation.fid reference latents --root {root} "
               f"--protocol ${{paper.fid.protocol}} --inception ${{paper.inception}} --batch ${{paper.fid.batch}} "
               f"--executor ${{paper.executor}} --cluster ${{paper.cluster}} --out {out}")
        return dict(cmd=cmd, deps=[root], outs=[out],
                    params=["paper.fid.protocol", "paper.fid.batch", "paper.inception", "paper.executor", "paper.cluster"])
    if dataset == "cifar10":
        cmd = f"python -m tract_repro.evaluation.fid reference cifar10 --protocol ${{paper.fid.protocol}} --out {out}"
        params = ["paper.fid.protocol"]
    else:
        cmd = (f"python -m tract_repro.evaluation.fid reference {dataset} --root ${{paper.data.{dataset}}} "
               f"--protocol ${{paper.fid.protocol}} --inception ${{paper.inception}} --batch ${{paper.fid.batch}} "
               f"--cache {PAPER_RUNS}/cache --executor ${{paper.executor}} --cluster ${{paper.cluster}} --out {out}")
        params = [f"paper.data.{dataset}", "paper.fid.protocol", "paper.fid.batch", "paper.inception", "paper.executor",
                  "paper.cluster"]
    return dict(cmd=cmd, deps=[f"{CHECKS}/{setup}/data.json"], params=params, outs=[out])


def setup_bindings(setup, teacher_run=None):
    """The --gin bindings that point a paper run at the params' data and at its teacher: the params' teacher
    file, or the folder of a run the pipeline trains (``teacher_run``).  A latent setup's runs read the encoded
    shards (DATA) and take their network from the params' model folder (MODEL)."""
    dataset = SETUPS[setup][0]
    if latent(setup):
        values = dict(MODEL=f"${{paper.teachers.{setup}}}", DATA=latent_folder(setup, "train"))
        if teacher_run is not None:
            values = dict(TEACHER=f"{PAPER_RUNS}/{teacher_run}", **values)
        return [f"--gin {quote(f'{k} = {v!r}')}" for k, v in values.items()], [f"paper.teachers.{setup}"]
    data = f"--gin {quote(f'DATA = {chr(39)}${{paper.data.{dataset}}}{chr(39)}')}"
    if teacher_run is not None:
        return [f"--gin {quote(f'TEACHER = {chr(39)}{PAPER_RUNS}/{teacher_run}{chr(39)}')}", data], [f"paper.data.{dataset}"]
    return [f"--gin {quote(f'TEACHER = {chr(39)}${{paper.teachers.{setup}}}{chr(39)}')}", data], \
        [f"paper.data.{dataset}", f"paper.teachers.{setup}"]


def paper_train_stage(name, spec):
    """A run the pipeline trains once at paper scale (guided distillation's teacher, or its stage 1 from that)."""
    teacher_run = spec.get("teacher_run")
    if teacher_run is None and latent(spec["setup"]):  # from the params' model folder, on the encoded shards
        paths, params = setup_bindings(spec["setup"])
        deps = [latent_folder(spec["setup"], "train"), f"{CHECKS}/{spec['setup']}/teacher.json"]
    elif teacher_run is None:
        dataset = SETUPS[spec["setup"]][0]
        paths, params = [f"--gin {quote(f'DATA = {chr(39)}${{paper.data.{dataset}}}{chr(39)}')}"], [f"paper.data.{dataset}"]
        deps = [f"{CHECKS}/{spec['setup']}/data.json"]
    else:
        paths, params = setup_bindings(spec["setup"], teacher_run)
        deps = [f"{PAPER_RUNS}/{teacher_run}"]
    args = [LAUNCH, "${paper.cluster}", spec["gin"], *[f"--gin {quote(b)}" for b in spec["bindings"]], *paths,
            "--executor ${paper.executor} --wait", f"--workdir {PAPER_RUNS}/{name}"]
    return dict(cmd=" ".join(args), deps=[*gin_deps(spec["gin"]), *deps], params=[*params, "paper.executor", "paper.cluster"],
                outs=[{f"{PAPER_RUNS}/{name}": {"cache": False, "persist": True}}])


def teacher_import_stage(name, spec):
    paths, params = setup_bindings(spec["setup"])
    args = ["python -m tract_repro.import_teacher", spec["gin"], *[f"--gin {quote(b)}" for b in spec["bindings"]],
            *paths, f"--workdir {PAPER_RUNS}/{name}"]
    return dict(cmd=" ".join(args), deps=[*gin_deps(spec["gin"]), f"{CHECKS}/{spec['setup']}/teacher.json"],
                params=params, outs=[{f"{PAPER_RUNS}/{name}": {"cache": False}}])


def paper_phase_stage(phase):
    paths, params = setup_bindings(phase.setup, phase.teacher)
    args = [LAUNCH, "${paper.cluster}", phase.gin, *[f"--gin {quote(b)}" for b in phase.stage_bindings()], *paths,
            f"--gin {quote(f'train.only_phase = {phase.index}')}"]
    deps = gin_deps(phase.gin)
    if phase.previous is not None:
        args.append(f"--gin {quote(f'train.previous = {phase.previous.workdir!r}')}")
        deps.append(phase.previous.workdir)
    elif phase.teacher is not None:
        deps.append(f"{PAPER_RUNS}/{phase.teacher}")
    else:
        deps += [f"{CHECKS}/{phase.setup}/data.json", f"{CHECKS}/{phase.setup}/teacher.json"]
    args += ["--executor ${paper.executor} --wait", f"--workdir {phase.workdir}"]
    # persist: a phase interrupted on the cluster resumes from its checkpoints when the stage runs again
    return dict(cmd=" ".join(args), deps=deps, params=[*params, "paper.executor", "paper.cluster"],
                outs=[{phase.workdir: {"cache": False, "persist": True}}])


def paper_eval_stage(target, setup, requests):
    """FID (and IS) of one run for every (sampler, w, steps) its rows ask for (``requests``: {(sampler, w): {steps}},
    w None without guidance): 3 seed ranges per step count; one command per sampler and set of step counts."""
    groups = {}
    for (sampler, w), steps in requests.items():
        groups.setdefault((sampler, tuple(sorted(steps, reverse=True))), []).append(w)
    cmds, metrics, pngs = [], [], []
    text = f" ${{paper.text_to_image}} --prompts {latent_folder(setup, 'prompts')}" if text_to_image(setup) else ""
    for (sampler, steps), ws in sorted(groups.items(), key=lambda kv: (kv[0][0], [-k for k in kv[0][1]])):
        ws = sorted(ws, key=w_key)
        guided = ws != [None]
        out = paper_eval_file(dict(target=target, sampler=sampler))
        if guided:  # one metrics file per w: the evaluation fills in {w}
            out = out.replace(".json", "_w{w}.json")
        chosen = ("" if sampler == "ddim" else f" --sampler {sampler}") + (f" --w {' '.join(f'{w:g}' for w in ws)}"
                                                                          if guided else "")
        cmds.append(f"python -m tract_repro.evaluation.fid evaluate {PAPER_RUNS}/{target} --steps "
                    f"{' '.join(map(str, steps))}{chosen} --reference {FID_REF}/{setup}.npz ${{paper.fid}}{text} "
                    f"--inception ${{paper.inception}} --executor ${{paper.executor}} --cluster ${{paper.cluster}} "
                    f"--out {out}")
        for w in ws:
            done = out if w is None else out.replace("{w}", f"{w:g}")
            metrics.append({done: {"cache": False}})
            pngs += [{done.replace(".json", f"_{k}steps" + ("" if w is None else f"_w{w:g}") + ".png"): {"cache": False}}
                     for k in steps]
    return dict(cmd=cmds if len(cmds) > 1 else cmds[0],
                deps=[f"{PAPER_RUNS}/{target}", f"{FID_REF}/{setup}.npz", *([latent_folder(setup, "prompts")] if text else [])],
                params=["paper.fid", *(["paper.text_to_image"] if text else []), "paper.inception", "paper.executor",
                        "paper.cluster"], metrics=metrics, outs=pngs)


def sanity_stage(dataset, steps):
    """``dvc repro sanity_<dataset>``: the imported teacher's FID from 10k samples at 64 and 1024 DDIM steps against
    the expected ranges (:mod:`tract_repro.evaluation.sanity`), about an hour on one GPU, PASS or FAIL in one line."""
    setup, teacher = SANITY[dataset]
    out = f"results/paper/sanity_{dataset}.json"
    return dict(cmd=f"python -m tract_repro.evaluation.fid sanity {PAPER_RUNS}/{teacher} --reference {FID_REF}/{setup}.npz "
                    f"${{paper.sanity.{dataset}}} --inception ${{paper.inception}} --executor ${{paper.executor}} "
                    f"--cluster ${{paper.cluster}} --out {out}",
                deps=[f"{PAPER_RUNS}/{teacher}", f"{FID_REF}/{setup}.npz"],
                params=[f"paper.sanity.{dataset}", "paper.inception", "paper.executor", "paper.cluster"],
                metrics=[{out: {"cache": False}}], outs=[{out.replace(".json", f"_{k}steps.png"): {"cache": False}}
                                                         for k in steps])


def build_paper(tables, paper, digits_tables=()):
    """The paper-scale stages; ``digits_tables`` own results/<table>.md (the paper stage then updates it in place)."""
    for key in ("executor", "cluster", "inception", "data", "teachers", "fid"):
        if key not in paper:
            raise ConfigError(f"params.yaml's paper section has no {key!r}")
    phases, teachers, evaluations = expand_paper(tables)
    setups = sorted({e["setup"] for e in evaluations})
    stages = {}
    for setup in setups:
        stages[f"paper_check_{setup}"] = check_stage(setup)
    for setup in filter(latent, setups):
        for part in latent_parts(setup):
            stages[f"paper_encode_{setup}_{part}"] = encode_stage(setup, part)
    for setup in setups:
        stages[f"paper_fid_ref_{setup}"] = reference_stage(setup)
    for name in sorted(teachers):
        if teachers[name].get("trains"):
            stages[f"paper_train_{name}"] = paper_train_stage(name, teachers[name])
        else:
            stages[f"paper_import_{name}"] = teacher_import_stage(name, teachers[name])
    for key in sorted(phases):
        stages[f"paper_run_{key}"] = paper_phase_stage(phases[key])
    wanted = {}
    for e in evaluations:
        entry = wanted.setdefault(e["target"], dict(setup=e["setup"], requests={}))
        entry["requests"].setdefault((e["sampler"], e.get("w")), set()).add(e["steps"])
    for target in sorted(wanted):
        stages[f"paper_eval_{target}"] = paper_eval_stage(target, wanted[target]["setup"], wanted[target]["requests"])
    for dataset, (setup, teacher) in SANITY.items():
        if dataset in paper.get("sanity", {}) and f"paper_import_{teacher}" in stages:
            stages[f"sanity_{dataset}"] = sanity_stage(dataset, paper["sanity"][dataset]["steps"])
    for name in tables:
        rows = [e for e in evaluations if e["table"] == name]
        if not rows:
            continue
        stage = dict(cmd=f"python -m tract_repro.results.tables {name} --paper-scale",
                     deps=[f"experiments/{name}.yaml", EVALUATIONS, *sorted({paper_eval_file(e) for e in rows})],
                     metrics=[{f"results/paper/{name}.json": {"cache": False}}])
        if name not in digits_tables:  # no digits stage writes this table's Markdown
            stage["outs"] = [{f"results/{name}.md": {"cache": False}}]
        stages[name] = stage
    return stages, index(evaluations)
