"""The generated DVC pipeline, phase sharing, the results tables, and a small real `dvc repro`."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tract_repro.results import pipeline, tables
from tract_repro.results.experiments import (
    EVALUATIONS, expand, load_run_templates, load_tables, read_evaluations, resolve,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def in_repo(monkeypatch):
    monkeypatch.chdir(ROOT)


def real_expansion():
    params = yaml.safe_load((ROOT / "params.yaml").read_text())["digits"]
    return expand(load_tables(ROOT / "experiments"), load_run_templates(ROOT / "experiments"), params)


def test_dvc_yaml_is_current(in_repo):
    params = yaml.safe_load(Path("params.yaml").read_text())
    tables = load_tables()
    built = pipeline.build(tables, load_run_templates(), params["digits"], params["paper"])
    found = {f.as_posix(): yaml.safe_load(f.read_text()) for f in map(Path, pipeline.pipeline_files())}
    assert found == pipeline.split(built, tables), "run `python -m tract_repro.results.pipeline`"
    # the table stages read each row's evaluation from the index written beside the pipeline files
    assert json.loads(Path(EVALUATIONS).read_text()) == json.loads(json.dumps(built["evaluations"]))
    assert read_evaluations("digits")["table1"]["tract_1step_student_2steps"]["steps"] == 2


def test_run_and_evaluation_stages_live_beside_their_first_table(in_repo):
    """dvc.yaml keeps what a user names; each run or evaluation stage sits in pipelines/<table>/dvc.yaml
    (DVC rewrites that file's small lock after each stage) and runs from the repository root."""
    root = yaml.safe_load(Path("dvc.yaml").read_text())["stages"]
    assert {"digits_table1", "digits_classifier", "digits_teacher", "table1"} <= set(root)
    assert not [n for n in root if n.startswith(("digits_run_", "digits_eval_", "paper_run_", "paper_eval_"))]
    table1 = yaml.safe_load(Path("pipelines/table1/dvc.yaml").read_text())
    assert table1["vars"] == ["../../params.yaml"] and all(s["wdir"] == "../.." for s in table1["stages"].values())
    assert "digits_eval_teacher" in table1["stages"]
    # the first phase Table 1's TRACT shares with Tables 3 and 4 belongs to Table 1
    shared = [n for n in table1["stages"] if n.startswith("digits_run_tract_1024-32_")]
    assert len(shared) == 1 and "extra_inference_emas" in table1["stages"][shared[0]]["cmd"]
    table4 = yaml.safe_load(Path("pipelines/table4/dvc.yaml").read_text())["stages"]
    assert not [n for n in table4 if n.startswith("digits_run_tract_1024-32_")]


def _producers(stages, name):
    """The stages that write ``name``'s deps."""
    made = {next(iter(o)) if isinstance(o, dict) else o: n for n, s in stages.items()
            for kind in ("outs", "metrics") for o in s.get(kind) or []}
    return {made[d] for d in stages[name]["deps"] if d in made}


def test_runs_shown_by_the_same_tables_share_one_evaluation_stage(in_repo):
    """One evaluation stage per teacher and per set of tables showing the same runs: a table waits only for the
    runs it shows, and each evaluation process covers all the group's runs and seeds."""
    stages = pipeline.load_stages()
    phases, evaluations = real_expansion()
    shared = {e["target"] for e in evaluations if e["table"] == "table3" and e["row"] == "mu_s_0.5"}
    assert {e["table"] for e in evaluations if e["target"] in shared} == {"table3", "table4", "table5"}
    assert _producers(stages, "digits_table4") == {"digits_eval_table4", "digits_eval_table3-table4-table5"}
    assert _producers(stages, "digits_table1") == {"digits_eval_teacher", "digits_eval_table1",
                                                   "digits_eval_table1-budget_sweep"}
    table4 = stages["digits_eval_table4"]
    shown = sorted({e["target"] for e in evaluations if e["table"] == "table4"} - shared)
    assert len(shown) == 3 and table4["deps"] == sorted(
        ["runs/digits/classifier", "runs/digits/teacher", *[f"runs/digits/{t}" for t in shown]])
    assert len(table4["cmd"]) == 1 and all(f"runs/digits/{t}/s{s}" in table4["cmd"][0] for t in shown for s in (0, 1, 2))
    # every evaluation file is written by exactly one stage
    outs = [next(iter(m)) for s in stages.values() for m in s.get("metrics") or [] if "/eval/" in next(iter(m))]
    assert len(outs) == len(set(outs))


def test_regenerating_re_files_lock_entries_and_drops_stale_ones(tmp_path):
    files = {"dvc.yaml": {"stages": {"t": {"cmd": "x"}}},
             "pipelines/a/dvc.yaml": {"vars": ["../../params.yaml"], "stages": {"r1": {"wdir": "../..", "cmd": "y"}}}}
    (tmp_path / "pipelines" / "old").mkdir(parents=True)
    (tmp_path / "pipelines" / "old" / "dvc.yaml").write_text("stages: {r1: {cmd: y}, gone: {cmd: z}}\n")
    (tmp_path / "pipelines" / "old" / "dvc.lock").write_text("schema: '2.0'\nstages:\n  r1:\n    cmd: y\n  gone:\n    cmd: z\n")
    (tmp_path / "dvc.lock").write_text("schema: '2.0'\nstages:\n  t:\n    cmd: x\n")
    pipeline.write(files, tmp_path)
    assert not (tmp_path / "pipelines" / "old").exists()
    assert yaml.safe_load((tmp_path / "pipelines" / "a" / "dvc.lock").read_text()) == {"schema": "2.0", "stages": {"r1": {"cmd": "y"}}}
    assert yaml.safe_load((tmp_path / "dvc.lock").read_text())["stages"] == {"t": {"cmd": "x"}}
    assert set(pipeline.load_stages(tmp_path)) == {"t", "r1"}


def test_identical_phases_are_shared_across_rows_and_tables(in_repo):
    phases, evaluations = real_expansion()
    where = {(e["table"], e["row"]): e["target"] for e in evaluations}
    # the paper's 5.24 configuration appears in Tables 3, 4 and 5: one run
    assert where[("table3", "mu_s_0.5")] == where[("table4", "mu_i_0.99995")] == where[("table5", "sched_1024_32_1")]
    # TRACT 1024→32→1 and 1024→32→2 share their first phase; the 1-step student sampled with 2 steps is the same run
    assert phases[where[("table1", "tract_2steps")]].previous is phases[where[("table1", "tract_1step")]].previous
    assert where[("table1", "tract_1step_student_2steps")] == where[("table1", "tract_1step")]
    # BTD's 2-step row evaluates the 4→2 phase of the same BTD run as its 1-step row
    assert phases[where[("table1", "btd_1step")]].previous.key == where[("table1", "btd_2steps")]
    # different μ_S means a different first phase
    firsts = {phases[where[("table3", r)]].previous.key for r in ("mu_s_0", "mu_s_0.5", "mu_s_0.9", "mu_s_0.99")}
    assert len(firsts) == 4
    # a first phase is trained the same whatever μ_I: Table 1's TRACT (residual 1e-3) and every μ_I of Table 4
    # continue from one phase-0 run, which tracks each of their inference EMAs; their second phases differ
    mu_i_rows = [("table4", r) for r in ("mu_i_0.999", "mu_i_0.9999", "mu_i_0.99995", "mu_i_0.99999")] + [("table1", "tract_1step")]
    first = phases[where[mu_i_rows[0]]].previous
    assert all(phases[where[row]].previous is first for row in mu_i_rows)
    assert len({where[row] for row in mu_i_rows}) == 5
    assert {s.label for s in first.ema_settings} == {"residual=0.001", "residual=3.73e-86", "residual=2.89e-09", "residual=5.38e-05", "residual=0.14"}
    bindings = first.stage_bindings()
    assert "inference_ema_momentum.residual = 0.001" in bindings and not any(b.startswith("INFERENCE_EMA") for b in bindings)
    assert "train.extra_inference_emas = [{'residual': 0.14}, {'residual': 2.89e-09}, {'residual': 3.73e-86}, " \
           "{'residual': 5.38e-05}]" in bindings
    # a run's final phase keeps μ_I in its identity: single-phase rows with different μ_I are different runs
    assert all(not p.ema_settings for p in phases.values() if p.key in {e["target"] for e in evaluations})
    # Table 6's 24M per phase is Table 5's four-phase row (96M over 4 phases)
    assert where[("table6", "sched_4096_512_64_8_1")] == where[("table5", "sched_4096_512_64_8_1")]
    assert all(p.index == 0 or p.previous is not None for p in phases.values())


def test_unknown_budget_symbol_is_an_error():
    assert resolve("$budget", {"budget": "64K"}) == "'64K'" and resolve(0.5, {}) == "0.5"
    with pytest.raises(ValueError, match=r"\$nope"):
        resolve("$nope", {"budget": "64K"})


def test_tables_report_means_stds_and_orderings(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    table = yaml.safe_load((ROOT / "experiments" / "table3.yaml").read_text())
    rows = {r["id"]: r for r in table["rows"]}
    scores = []
    for seed in (0, 1, 2):
        for i, row in enumerate(["mu_s_0", "mu_s_0.5", "mu_s_0.9", "mu_s_0.99"]):
            scores.append(dict(row=row, seed=seed, nfe=1, digits_fd=[10, 20, 12, 30][i] + seed, fidelity_rmse=0.1,
                               noise_floor=5.0, samples=500))
    summary = tables.summarise(pd.DataFrame(scores))
    assert summary.loc["mu_s_0.5", "fd_mean"] == 21 and summary.loc["mu_s_0.5", "fd_std"] == pytest.approx(1.0)
    orderings = tables.check_orderings(table, summary)
    claimed = {(o["better"], o["worse"]): o["holds"] for o in orderings}
    assert claimed[("mu_s_0.5", "mu_s_0")] is False and claimed[("mu_s_0.9", "mu_s_0.99")] is True
    summary.attrs.update(noise_floor=5.0, samples=500)
    text = tables.render(table, summary, orderings)
    assert "21.00 ± 1.00 (n=3)" in text and "5.24 (M; S2)" in text and "✗ < μ_S = 0" in text
    assert f"{sum(o['holds'] for o in orderings)} of {len(orderings)} claimed pairwise orderings hold" in text
    assert rows["mu_s_0.5"]["paper"]["value"] == 5.24


TINY_TABLE = {
    "table": "tiny", "title": "Tiny pipeline", "paper": {"dataset": "digits", "metric": "none", "setting": "CI"},
    "digits": {"metric": "digits_fd", "seeds": [0, 1]},
    "ordering": {"claim": "TRACT beats BTD", "pairs": [["tract", "btd"]]},
    "rows": [
        {"id": "teacher", "label": "Teacher 8 steps", "paper": {"value": None}, "digits": {"run": "teacher", "bindings": {}, "steps": 8}},
        {"id": "tract", "label": "TRACT 1024→32→1", "paper": {"value": None},
         "digits": {"run": "tract", "bindings": {"SCHEDULE": "(1024, 32, 1)", "TOTAL": "$budget"}, "steps": 1}},
        {"id": "tract2", "label": "TRACT 1024→32→2", "paper": {"value": None},
         "digits": {"run": "tract", "bindings": {"SCHEDULE": "(1024, 32, 2)", "TOTAL": "$budget"}, "steps": 2}},
        {"id": "btd", "label": "BTD 8→4→2→1", "paper": {"value": None},
         "digits": {"run": "btd", "bindings": {"START_STEPS": 8, "TOTAL": "$budget"}, "steps": 1}},
    ],
}
TINY_PARAMS = {"digits": dict(teacher_total="1280", budget="768", phase_budget="384", binary_phase_budget="128",
                              eval_samples=40, eval_workers=1, reference_steps=8, parallel=2, classifier_epochs=12)}


def test_small_pipeline_runs_with_dvc(tmp_path):
    """`dvc repro digits_tiny` from a fresh checkout layout: classifier, teacher, shared phases, evals, table."""
    for item in ("gin", "experiments/runs.yaml"):
        src, dst = ROOT / item, tmp_path / item
        shutil.copytree(src, dst) if src.is_dir() else (dst.parent.mkdir(parents=True, exist_ok=True), shutil.copy(src, dst))
    (tmp_path / "experiments" / "tiny.yaml").write_text(yaml.safe_dump(TINY_TABLE, allow_unicode=True))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(TINY_PARAMS))
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}", DVC_NO_ANALYTICS="1",
               TQDM_DISABLE="1", PYTHONPATH=str(ROOT))

    def run(*cmd):
        return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)

    assert run(sys.executable, "-m", "tract_repro.results.pipeline").returncode == 0
    stages = pipeline.load_stages(tmp_path)
    assert sum(name.startswith("digits_run_tract_1024-32_") for name in stages) == 1  # phase 0 shared by both TRACT rows
    assert run("git", "init", "-q").returncode == 0 and run("dvc", "init", "-q").returncode == 0
    done = run("dvc", "repro", "digits_tiny")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    text = (tmp_path / "results" / "tiny.md").read_text()
    measured = json.loads((tmp_path / "results" / "digits" / "tiny.json").read_text())
    assert {r["row"] for r in measured["rows"]} == {"teacher", "tract", "tract2", "btd"}
    assert all(r["n"] == (1 if r["row"] == "teacher" else 2) for r in measured["rows"])
    assert "± " in text and (tmp_path / "results" / "digits" / "tiny.png").is_file()
    assert (tmp_path / "runs" / "digits" / "teacher" / "ema.pt").is_file()

    # a failing stage says why in one line and leaves earlier outputs intact
    teacher_weights = (tmp_path / "runs" / "digits" / "teacher" / "ema.pt").read_bytes()
    params = dict(TINY_PARAMS["digits"], budget="64")  # a phase shorter than one batch
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"digits": params}))
    assert run(sys.executable, "-m", "tract_repro.results.pipeline").returncode != 0
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"digits": dict(TINY_PARAMS["digits"], eval_samples=-1)}))
    failed = run("dvc", "repro", "digits_tiny")
    assert failed.returncode != 0
    assert [line for line in failed.stderr.splitlines() if line.startswith("error:")], failed.stderr[-2000:]
    assert (tmp_path / "runs" / "digits" / "teacher" / "ema.pt").read_bytes() == teacher_weights


@pytest.mark.parametrize("sweep, span", [("budget_sweep", 16), ("budget_sweep_gpu", 8)])
def test_budget_sweep_plots_lines_against_the_budget(tmp_path, sweep, span):
    table = yaml.safe_load((ROOT / "experiments" / f"{sweep}.yaml").read_text())
    params = yaml.safe_load((ROOT / "params.yaml").read_text())["digits"]
    xs = sorted({r["digits"]["x"] for r in table["rows"]})
    assert len(xs) >= 4 and all(x in params for x in xs)  # x names the params.yaml budget of each row
    budgets = sorted(int(params[x][:-1]) for x in xs)
    assert budgets[-1] / budgets[0] >= span  # the CPU sweep spans 16× or more; the GPU sweep reaches 8× the tables' budget
    scores = pd.DataFrame([dict(row=r["id"], seed=s, nfe=1, digits_fd=10.0 + s, fidelity_rmse=0.1, noise_floor=3.0,
                                samples=500) for r in table["rows"] for s in (0, 1, 2)])
    summary = tables.summarise(scores)
    tables.plot(table, summary, tmp_path / "sweep.png", params)
    assert (tmp_path / "sweep.png").stat().st_size > 1000


def test_each_teacher_has_its_stage_and_edm_rows_use_the_edm_teacher(in_repo):
    stages = pipeline.load_stages()
    assert "digits_teacher" in stages and "digits_edm_teacher" in stages
    assert stages["digits_edm_teacher"]["deps"] == ["gin/digits_edm_teacher.gin", "gin/digits/edm.gin"]
    edm_phases = [v for k, v in stages.items() if k.startswith("digits_run_tract_edm_") or k.startswith("digits_run_btd_edm_")]
    assert edm_phases and all("TEACHER = 'runs/digits/edm_teacher'" in v["cmd"] for v in edm_phases)
    heun = stages["digits_eval_edm_teacher"]
    assert heun["cmd"] == [c for c in heun["cmd"] if "--sampler heun" in c] and "--steps 18" in heun["cmd"][0]
    assert "results/digits/eval/edm_teacher/s0_heun.json" in stages["digits_table1_edm"]["deps"]
    assert not [d for d in stages["digits_table1"]["deps"] if "edm" in d]  # Table 1's VP rows wait for one teacher only


def test_training_curves_follow_each_run_back_through_its_phases(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    table = dict(table="t", title="T", rows=[dict(id="r", label="R")])
    monkeypatch.setattr(tables, "_evaluation_of", lambda t, r: dict(target="p1", teacher="teacher", seeds=[0]))
    for phase, previous in (("p0", None), ("p1", "runs/digits/p0/s0")):
        run = tmp_path / "runs" / "digits" / phase / "s0"
        run.mkdir(parents=True)
        k = int(phase[1])
        (run / "metrics.jsonl").write_text("".join(json.dumps(dict(samples=100 * (2 * k + i + 1), phase=k, loss=1.0 / (2 * k + i + 1))) + "\n"
                                                   for i in range(2)))
        (run / "run.json").write_text(json.dumps(dict(previous=previous)))
    curves = tables.training_curves(table)
    assert curves.samples.tolist() == [100, 200, 300, 400] and curves.phase.tolist() == [0, 0, 1, 1]
    assert curves.loss.tolist() == [1.0, 0.5, 1 / 3, 0.25]
    tables.plot_curves(table, curves, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 1000


def test_run_stages_follows_dependencies_and_stops_below_a_failure(tmp_path, monkeypatch):
    """run_stages (DVC-less training on a lent machine): each stage after the stages writing its deps, a dep
    inside another stage's output included; a failed stage's downstream does not run."""
    from tract_repro.results import run_stages

    monkeypatch.chdir(tmp_path)
    stages = {
        "b": dict(cmd="test -f runs/a/s0 && mkdir -p runs/b && echo ${digits.parallel} > runs/b/done", deps=["runs/a/s0"],
                  outs=["runs/b"]),
        "a": dict(cmd=["mkdir -p runs/a", "touch runs/a/s0"], outs=["runs/a"]),
        "bad": dict(cmd="exit 3", outs=["runs/bad"]),
        "after_bad": dict(cmd="touch never", deps=["runs/bad"], outs=["runs/after"]),
    }
    assert pipeline.upstream_stages(stages) == {"a": set(), "b": {"a"}, "bad": set(), "after_bad": {"bad"}}
    done, failed = run_stages.run(stages, {"digits": {"parallel": 3}}, jobs=2)
    assert done == {"a", "b"} and failed == ["bad"]
    assert (tmp_path / "runs" / "b" / "done").read_text() == "3\n" and not (tmp_path / "never").exists()


def test_run_stages_names_an_unknown_table_in_one_line(in_repo, capsys):
    from tract_repro.results import run_stages

    assert run_stages.main(["no_such_table"]) == 2
    assert capsys.readouterr().err.strip().count("\n") == 0


def test_the_guided_table_trains_stage_1_once_and_evaluates_every_row_at_every_w(in_repo):
    """Guided digits: teacher → stage 1 (trained once, from the teacher) → BTD, TRACT and stochastic-sampler phases;
    every row at each w of the table, one metrics file per w; the stochastic students share the BTD chain."""
    stages = pipeline.load_stages()
    stage1 = stages["digits_guided_stage1"]
    assert "TEACHER = 'runs/digits/guided_teacher'" in stage1["cmd"] and "runs/digits/guided_teacher" in stage1["deps"]
    assert stage1["params"] == ["digits.guided_stage1_total"]
    assert stages["digits_guided_teacher"]["params"] == ["digits.guided_teacher_total"]
    _, evaluations = real_expansion()
    guided = {e["row"]: e for e in evaluations if e["table"] == "guided"}
    assert {r.split("@")[1] for r in guided if r.startswith("btd_4steps@")} == {"w0", "w0.5", "w1", "w2", "w4"}
    assert [r for r in guided if r.startswith("teacher_1024@")] == ["teacher_1024@w0"]
    assert guided["stage1_64@w1"]["target"] == "guided_stage1" and guided["stage1_64@w1"]["seeds"] == [0]
    phases, _ = real_expansion()
    stochastic, plain = phases[guided["btd_stochastic_4steps@w0"]["target"]], guided["btd_4steps@w0"]["target"]
    assert stochastic.previous.key == plain and stochastic.student_steps == 2  # 4 → 2 with 2/4 jumps from every level
    assert "STOCHASTIC = True" in stages[f"digits_run_{stochastic.key}"]["cmd"]
    assert "STOCHASTIC" not in stages[f"digits_run_{plain}"]["cmd"]
    evals = stages["digits_eval_guided"]
    cmd = next(c for c in evals["cmd"] if f"runs/digits/{stochastic.key}/s0" in c)
    assert "--sampler stochastic --w 0 0.5 1 2 4" in cmd and f"results/digits/eval/{stochastic.key}/s0_stochastic_w{{w}}.json" in cmd
    assert {f"results/digits/eval/{stochastic.key}/s1_stochastic_w0.5.json": {"cache": False}} in evals["metrics"]
    assert {f"results/digits/eval/{stochastic.key}/s1_stochastic_w0.5_4steps_w0.5_classes.png": {"cache": False}} in evals["outs"]
    teacher = stages["digits_eval_guided_teacher"]["cmd"]
    assert any("--steps 1024 256 64 8 4 2 1 --w 0 " in c for c in teacher) and any("--steps 256 64 8 4 2 1 --w 0.5 1 2 4 " in c for c in teacher)
    table = stages["digits_guided"]
    assert {"results/digits/guided_grids.png": {"cache": False}} in table["outs"]
