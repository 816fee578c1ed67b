"""The paper-scale DVC stages: what they chain, how they share phases, the one-line check that
`dvc repro table1` meets first without data, and the paper-scale column of results/<table>.md."""
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tract_repro.results import check, pipeline, tables
from tract_repro.results.experiments import expand_paper, load_run_templates, load_tables

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def in_repo(monkeypatch):
    monkeypatch.chdir(ROOT)


@pytest.fixture(scope="module")
def stages():
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


@pytest.fixture(scope="module")
def expansion():
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        return expand_paper(load_tables())
    finally:
        os.chdir(cwd)


def test_digits_stages_do_not_depend_on_the_paper_section(in_repo):
    params = yaml.safe_load(Path("params.yaml").read_text())
    digits_only = pipeline.build(load_tables(), load_run_templates(), params["digits"])["stages"]
    both = pipeline.build(load_tables(), load_run_templates(), params["digits"], params["paper"])["stages"]
    assert all(name.startswith("digits_") for name in digits_only)
    assert {k: v for k, v in both.items() if k.startswith("digits_")} == digits_only


def test_every_table_with_paper_rows_has_its_stage(stages):
    for path in sorted((ROOT / "experiments").glob("*.yaml")):
        table = yaml.safe_load(path.read_text())
        if path.stem == "runs":
            continue
        has_paper = any(r.get("paper_scale") for r in table["rows"])
        assert (path.stem in stages) == has_paper, path.stem
    for name in ("table1", "table1_edm", "table2", "table3", "table4", "table5", "table6", "btd_vs_tract"):
        assert stages[name]["cmd"] == f"python -m tract_repro.results.tables {name} --paper-scale"
        assert stages[name]["metrics"] == [{f"results/paper/{name}.json": {"cache": False}}]
    assert stages["table2"]["outs"] == [{"results/table2.md": {"cache": False}}]  # no digits stage writes it
    assert "outs" not in stages["table1"]  # digits_table1 owns results/table1.md


def test_the_chain_from_check_to_table(stages, expansion):
    phases, teachers, evaluations = expansion
    row = next(e for e in evaluations if (e["table"], e["row"]) == ("table1", "tract_1step"))
    last = phases[row["target"]]
    first = last.previous
    run_last, run_first = stages[f"paper_run_{last.key}"], stages[f"paper_run_{first.key}"]
    # phase 0 waits for the check; phase 1 continues phase 0's run
    assert "runs/paper/checks/cifar10_pd/teacher.json" in run_first["deps"]
    assert f"runs/paper/{first.key}" in run_last["deps"] and f"train.previous = 'runs/paper/{first.key}'" in run_last["cmd"]
    for stage in (run_first, run_last):
        assert stage["cmd"].startswith("python -m tract_repro.launch gin/cifar10_tract.gin ")
        assert "--executor ${paper.executor} --wait" in stage["cmd"]
        assert "TEACHER = '${paper.teachers.cifar10_pd}'" in stage["cmd"] and "DATA = '${paper.data.cifar10}'" in stage["cmd"]
        assert list(stage["outs"][0].values())[0] == {"cache": False, "persist": True}
    evaluation = stages[f"paper_eval_{last.key}"]
    assert evaluation["deps"] == [f"runs/paper/{last.key}", "runs/paper/fid_ref/cifar10_pd.npz"]
    assert "${paper.fid}" in evaluation["cmd"] and "--steps 2 1" in evaluation["cmd"]  # 1-step student also at 2 steps
    assert f"results/paper/eval/{last.key}/metrics.json" in stages["table1"]["deps"]
    assert stages["paper_fid_ref_cifar10_pd"]["deps"] == ["runs/paper/checks/cifar10_pd/data.json"]
    assert stages["paper_check_cifar10_pd"]["always_changed"] is True
    # teacher rows evaluate Google's checkpoint, imported into a run directory
    assert set(teachers) == {"cifar10_teacher"}
    assert "--steps 1024 64 8 2 1" in stages["paper_eval_cifar10_teacher"]["cmd"]
    assert stages["paper_import_cifar10_teacher"]["cmd"].startswith("python -m tract_repro.import_teacher gin/cifar10_teacher.gin")
    # the EDM rows need the EDM teacher only; ImageNet references are computed on the cluster
    edm = next(e for e in evaluations if e["table"] == "table1_edm")
    assert edm["setup"] == "cifar10_edm" and "paper_check_cifar10_edm" in stages
    assert "--executor ${paper.executor}" in stages["paper_fid_ref_imagenet64_pd"]["cmd"]


def test_paper_phases_are_shared_across_tables(expansion):
    phases, _, evaluations = expansion
    where = {(e["table"], e["row"]): e["target"] for e in evaluations}
    assert where[("table3", "mu_s_0.5")] == where[("table4", "mu_i_0.99995")] == where[("table5", "sched_1024_32_1")] \
        == where[("table6", "sched_1024_32_1")]  # 2 × 48M is both "96M in all" and "48M per phase"
    assert phases[where[("table1", "tract_2steps")]].previous is phases[where[("table1", "tract_1step_256M")]].previous
    assert where[("table2", "tract_4steps")] == where[("table2", "tract_1step")]
    assert phases[where[("table1", "btd_1step")]].previous.key == where[("table1", "btd_2steps")]
    assert all(p.seeds == {0} for p in phases.values())


def test_params_name_the_protocol():
    paper = yaml.safe_load((ROOT / "params.yaml").read_text())["paper"]
    assert paper["executor"] == "slurm"
    assert paper["fid"]["samples"] == 50_000 and paper["fid"]["seed-ranges"] == [0, 50_000, 100_000]
    assert paper["data"] == {"cifar10": "data/cifar10", "imagenet64": "data/imagenet64"}
    assert set(paper["teachers"]) == set(check.SETUPS)


def test_check_writes_identities_when_everything_is_there(tmp_path, monkeypatch):
    from tract_repro.evaluation import sources

    monkeypatch.setattr(sources, "cleanfid_stats_folder", lambda: tmp_path / "stats")
    args = ["cifar10_pd", "--data", str(tmp_path / "cifar10"), "--teacher", str(tmp_path / "teacher"),
            "--inception", str(tmp_path / "inception-2015-12-05.pt"), "--out", str(tmp_path / "out")]
    assert check.main(args) == 2
    for i in range(1, 6):
        (tmp_path / "cifar10" / "cifar-10-batches-py").mkdir(parents=True, exist_ok=True)
        (tmp_path / "cifar10" / "cifar-10-batches-py" / f"data_batch_{i}").write_bytes(b"x" * i)
    for path in (tmp_path / "teacher", tmp_path / "inception-2015-12-05.pt", tmp_path / "stats" / "cifar10_clean_train_32.npz"):
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"weights")
    assert check.main(args) == 0
    data = json.loads((tmp_path / "out" / "data.json").read_text())
    teacher = json.loads((tmp_path / "out" / "teacher.json").read_text())
    assert data["files"][0] == ["cifar-10-batches-py/data_batch_1", 1] and len(data["files"]) == 5
    assert teacher["sha256"] == check.sha256(tmp_path / "teacher")


def test_dvc_repro_table1_without_data_fails_fast_in_one_line(tmp_path):
    """A fresh copy of the repository with no data, teachers or Inception weights: the first stage stops."""
    for item in ("gin", "experiments", "params.yaml", "dvc.yaml"):
        src = ROOT / item
        shutil.copytree(src, tmp_path / item) if src.is_dir() else shutil.copy(src, tmp_path / item)
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}", DVC_NO_ANALYTICS="1",
               PYTHONPATH=str(ROOT))
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"]):
        assert subprocess.run(cmd, cwd=tmp_path, env=env).returncode == 0
    start = time.perf_counter()
    done = subprocess.run(["dvc", "repro", "table1"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    elapsed = time.perf_counter() - start
    assert done.returncode != 0
    errors = [ln for ln in (done.stdout + done.stderr).splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, done.stdout + done.stderr
    line = errors[0]
    for needed in ("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "data/cifar10",
                   "gsutil cp gs://gresearch/diffusion-distillation/cifar_original ckpts/cifar_original",
                   "inception-2015-12-05.pt", "cifar10_clean_train_32.npz"):
        assert needed in line, needed
    assert "Running stage 'paper_check_cifar10_pd'" in done.stdout and "paper_run_" not in done.stdout
    assert not (tmp_path / "runs" / "paper" / "checks" / "cifar10_pd" / "data.json").exists()
    assert elapsed < 60, f"dvc repro took {elapsed:.0f} s"


def fake_metrics(path, run, steps, fids, mode="clean"):
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [dict(steps=k, nfe=k, sampler="ddim", ema="inference", mode=mode, samples_per_range=50_000,
                 seed_ranges=[[0, 49_999], [50_000, 99_999], [100_000, 149_999]], reference_sha256="ab" * 32,
                 fid=f, fid_mean=sum(f) / len(f), fid_std=0.05) for k, f in zip(steps, fids)]
    path.write_text(json.dumps(dict(run=run, weights_sha256="cd" * 32, results=rows)))


def test_table_stage_writes_the_paper_scale_column(tmp_path, monkeypatch, expansion):
    for item in ("gin", "experiments", "params.yaml"):
        src = ROOT / item
        shutil.copytree(src, tmp_path / item) if src.is_dir() else shutil.copy(src, tmp_path / item)
    monkeypatch.chdir(tmp_path)
    where = {(e["table"], e["row"]): e["target"] for e in expansion[2]}
    values = {"mu_s_0": 6.4, "mu_s_0.5": 5.3, "mu_s_0.9": 6.1}  # μ_S = 0.99 not evaluated yet
    for row, value in values.items():
        target = where[("table3", row)]
        fake_metrics(tmp_path / "results" / "paper" / "eval" / target / "metrics.json", f"runs/paper/{target}", [1],
                     [[value - 0.05, value, value + 0.05]])
    assert tables.main(["table3", "--paper-scale"]) == 0
    saved = json.loads((tmp_path / "results" / "paper" / "table3.json").read_text())
    assert set(saved["rows"]) == set(values) and saved["rows"]["mu_s_0.5"]["fid_mean"] == pytest.approx(5.3)
    claimed = {(o["better"], o["worse"]): o["holds"] for o in saved["orderings"]}
    assert claimed[("mu_s_0.5", "mu_s_0")] is True and claimed[("mu_s_0.5", "mu_s_0.99")] is None
    text = (tmp_path / "results" / "table3.md").read_text()
    assert "5.30 ± 0.05 (clean)" in text and "3 seed ranges of 50,000 samples (clean-fid clean)" in text
    assert "2 of 2 claimed pairwise orderings hold" in text and "`dvc repro table3`" in text
    assert not (tmp_path / "results" / "digits").exists()  # paper mode leaves the digits outputs alone
