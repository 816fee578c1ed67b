"""The paper-scale DVC stages: what they chain, how they share phases, the one-line check that
`dvc repro table1` meets first without data, and the paper-scale column of results/<table>.md."""
import json
import os
import shutil
import subprocess
import sys
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
    return pipeline.load_stages(ROOT)


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
    for name in ("table1", "table1_edm", "table2", "table3", "table4", "table5", "table6", "btd_vs_tract",
                 "guided_imagenet64", "guided_cifar10"):
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
        assert stage["cmd"].startswith("python -m tract_repro.launch ${paper.cluster} gin/cifar10_tract.gin ")
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
    assert {n for n, t in teachers.items() if not t.get("trains")} == {"cifar10_teacher"}
    assert "--steps 1024 64 8 2 1" in stages["paper_eval_cifar10_teacher"]["cmd"]
    assert stages["paper_import_cifar10_teacher"]["cmd"].startswith("python -m tract_repro.import_teacher gin/cifar10_teacher.gin")
    # the EDM rows need the EDM teacher only; ImageNet references are computed on the cluster
    edm = next(e for e in evaluations if e["table"] == "table1_edm")
    assert edm["setup"] == "cifar10_edm" and "paper_check_cifar10_edm" in stages
    assert "--executor ${paper.executor} --cluster ${paper.cluster}" in stages["paper_fid_ref_imagenet64_pd"]["cmd"]
    assert "--cluster ${paper.cluster}" in evaluation["cmd"] and "paper.cluster" in evaluation["params"]


def test_paper_phases_are_shared_across_tables(expansion):
    phases, _, evaluations = expansion
    where = {(e["table"], e["row"]): e["target"] for e in evaluations}
    assert where[("table3", "mu_s_0.5")] == where[("table4", "mu_i_0.99995")] == where[("table5", "sched_1024_32_1")]
    assert where[("table6", "sched_4096_512_64_8_1")] == where[("table5", "sched_4096_512_64_8_1")]  # 4 × 24M = 96M
    # the first phase does not depend on μ_I: Table 1's TRACT (μ_I from residual 1e-3) and Table 4's fixed μ_I share it
    assert phases[where[("table1", "tract_1step")]].previous is phases[where[("table4", "mu_i_0.999")]].previous
    assert phases[where[("table1", "tract_2steps")]].previous is phases[where[("table1", "tract_1step_256M")]].previous
    assert where[("table2", "tract_4steps")] == where[("table2", "tract_1step")]
    assert phases[where[("table1", "btd_1step")]].previous.key == where[("table1", "btd_2steps")]
    assert all(p.seeds == {0} for p in phases.values())


def test_params_name_the_protocol():
    paper = yaml.safe_load((ROOT / "params.yaml").read_text())["paper"]
    assert paper["executor"] == "slurm"
    assert paper["fid"]["samples"] == 50_000 and paper["fid"]["seed-ranges"] == [0, 50_000, 100_000]
    assert paper["fid"]["protocol"] == "tract"  # the official TRACT code's FID, to compare with the paper's numbers
    assert paper["sanity"]["cifar10"]["samples"] == 10_000 and paper["sanity"]["cifar10"]["steps"] == [64, 1024]
    assert paper["data"] == {"cifar10": "data/cifar10", "imagenet64": "data/imagenet64", "sd15": "data/sd15_shards",
                             "coco2014_val": "data/coco2014_val", "imagenet256": "data/imagenet256_shards"}
    assert set(paper["teachers"]) == {s for s, (_, fetched, _) in check.SETUPS.items() if fetched}  # *_guided: trained here


def test_check_writes_identities_when_everything_is_there(tmp_path, monkeypatch):
    from tract_repro.evaluation import sources

    monkeypatch.setattr(sources, "cleanfid_stats_folder", lambda: tmp_path / "stats")
    args = ["cifar10_pd", "--data", str(tmp_path / "cifar10"), "--teacher", str(tmp_path / "teacher"),
            "--inception", str(tmp_path), "--out", str(tmp_path / "out")]
    assert check.main(args) == 2
    for i in range(1, 6):
        (tmp_path / "cifar10" / "cifar-10-batches-py").mkdir(parents=True, exist_ok=True)
        (tmp_path / "cifar10" / "cifar-10-batches-py" / f"data_batch_{i}").write_bytes(b"x" * i)
    problems = check.check("cifar10_pd", tmp_path / "cifar10", tmp_path / "teacher", tmp_path)[0]
    assert any("pt_inception-2015-12-05-6726825d.pth (FID protocol tract)" in p for p in problems)
    assert any("cifar10_legacy_pytorch_train_32.npz" in p for p in problems)  # the tract protocol's statistics
    for path in (tmp_path / "teacher", tmp_path / "pt_inception-2015-12-05-6726825d.pth",
                 tmp_path / "stats" / "cifar10_legacy_pytorch_train_32.npz"):
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"weights")
    assert check.main(args) == 0
    data = json.loads((tmp_path / "out" / "data.json").read_text())
    teacher = json.loads((tmp_path / "out" / "teacher.json").read_text())
    assert data["files"][0] == ["cifar-10-batches-py/data_batch_1", 1] and len(data["files"]) == 5
    assert teacher["sha256"] == check.sha256(tmp_path / "teacher")


def offline_copy(tmp_path):
    """The repository's pipeline in a fresh git + DVC folder with no data, teachers or Inception weights; its env."""
    for item in ("gin", "experiments", "params.yaml", "dvc.yaml", "pipelines"):
        src = ROOT / item
        shutil.copytree(src, tmp_path / item) if src.is_dir() else shutil.copy(src, tmp_path / item)
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}", DVC_NO_ANALYTICS="1",
               PYTHONPATH=str(ROOT))
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"]):
        assert subprocess.run(cmd, cwd=tmp_path, env=env).returncode == 0
    return env


def repro_offline(tmp_path, target):
    """``dvc repro target`` in an offline copy of the repository: it must fail; (the run, its ``error:`` lines)."""
    env = offline_copy(tmp_path)
    done = subprocess.run(["dvc", "repro", target], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    return done, [ln for ln in (done.stdout + done.stderr).splitlines() if ln.startswith("error:")]


@pytest.mark.parametrize("target", ["table1", "sanity_cifar10"])
def test_dvc_repro_table1_without_data_fails_fast_in_one_line(tmp_path, target):
    """A fresh copy of the repository with no data, teachers or Inception weights: the first stage stops (a table,
    or the teacher's hour-long sanity check)."""
    done, errors = repro_offline(tmp_path, target)
    assert len(errors) == 1, done.stdout + done.stderr
    line = errors[0]
    for needed in ("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "data/cifar10",
                   "gsutil cp gs://gresearch/diffusion-distillation/cifar_original ckpts/cifar_original",
                   "pt_inception-2015-12-05-6726825d.pth", "cifar10_legacy_pytorch_train_32.npz"):
        assert needed in line, needed
    assert "Running stage 'paper_check_cifar10_pd'" in done.stdout and "paper_run_" not in done.stdout
    assert not (tmp_path / "runs" / "paper" / "checks" / "cifar10_pd" / "data.json").exists()


def test_dvc_repro_guided_imagenet64_without_data_fails_fast_in_one_line(tmp_path):
    """Guided distillation trains its own teacher: offline, the check names the data and the Inception weights only."""
    done, errors = repro_offline(tmp_path, "guided_imagenet64")
    assert len(errors) == 1, done.stdout + done.stderr
    assert "train_data_batch_*.npz" in errors[0] and "data/imagenet64" in errors[0]
    assert "pt_inception-2015-12-05-6726825d.pth" in errors[0]
    inputs = [part for part in errors[0].split("; ") if "sbatch" not in part]  # (params.yaml's executor is slurm)
    assert "gsutil" not in errors[0] and ".pkl" not in errors[0] and len(inputs) == 2  # no teacher to fetch
    assert "Running stage 'paper_check_imagenet64_guided'" in done.stdout and "paper_train_" not in done.stdout


def test_the_guided_chain_trains_its_teacher_and_stage_1_then_distils_at_every_w(stages, expansion):
    phases, teachers, evaluations = expansion
    assert teachers["imagenet64_guided_teacher"]["trains"] and teachers["imagenet64_guided_stage1"]["trains"]
    teacher, stage1 = stages["paper_train_imagenet64_guided_teacher"], stages["paper_train_imagenet64_guided_stage1"]
    assert "runs/paper/checks/imagenet64_guided/data.json" in teacher["deps"] and "TEACHER" not in teacher["cmd"]
    assert "runs/paper/imagenet64_guided_teacher" in stage1["deps"]
    assert "TEACHER = 'runs/paper/imagenet64_guided_teacher'" in stage1["cmd"]
    row = next(e for e in evaluations if (e["table"], e["row"]) == ("guided_imagenet64", "tract_4steps@w2"))
    assert row["w"] == 2.0 and row["setup"] == "imagenet64_guided"
    first = stages[f"paper_run_{phases[row['target']].previous.key}"]
    assert "TEACHER = 'runs/paper/imagenet64_guided_stage1'" in first["cmd"] and "runs/paper/imagenet64_guided_stage1" in first["deps"]
    evaluation = stages[f"paper_eval_{row['target']}"]
    assert "--w 0 0.5 1 2 4" in evaluation["cmd"] and "metrics_w{w}.json" in evaluation["cmd"]
    assert f"results/paper/eval/{row['target']}/metrics_w2.json" in stages["guided_imagenet64"]["deps"]
    cmds = stages["paper_eval_imagenet64_guided_teacher"]["cmd"]  # 1024 steps only at w = 0
    assert any("--steps 1024 64 --w 0 " in c for c in cmds) and any("--steps 64 --w 0.5 1 2 4 " in c for c in cmds)
    stochastic = next(e for e in evaluations if e["row"] == "btd_stochastic_4steps@w0" and e["table"] == "guided_imagenet64")
    assert stochastic["sampler"] == "stochastic"
    assert phases[stochastic["target"]].previous.key == next(
        e for e in evaluations if e["row"] == "btd_4steps@w0" and e["table"] == "guided_imagenet64")["target"]


def fake_metrics(path, run, steps, fids, protocol="tract"):
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [dict(steps=k, nfe=k, sampler="ddim", ema="inference", protocol=protocol, samples_per_range=50_000,
                 seed_ranges=[[0, 49_999], [50_000, 99_999], [100_000, 149_999]], reference_sha256="ab" * 32,
                 fid=f, fid_mean=sum(f) / len(f), fid_std=0.05) for k, f in zip(steps, fids)]
    path.write_text(json.dumps(dict(run=run, weights_sha256="cd" * 32, results=rows)))


def test_table_stage_writes_the_paper_scale_column(tmp_path, monkeypatch, expansion):
    for item in ("gin", "experiments", "params.yaml", "pipelines"):
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
    assert "5.30 ± 0.05 (tract)" in text and "3 seed ranges of 50,000 samples (FID protocol tract: official TRACT" in text
    assert "2 of 2 claimed pairwise orderings hold" in text and "`dvc repro table3`" in text
    assert not (tmp_path / "results" / "digits").exists()  # paper mode leaves the digits outputs alone


def test_cluster_options_parse_with_every_paper_run_file(in_repo):
    from tract_repro import config
    from tract_repro.launching import slurm

    for run_file in ("gin/cifar10_tract.gin", "gin/imagenet64_2phase.gin", "gin/cifar10_tract_edm.gin"):
        config.parse(["gin/paper/cluster.gin", run_file])
        options = slurm.SlurmOptions()
        assert (options.tasks_per_node, options.gpus_per_node) == (8, 8)  # 8 data-parallel ranks of 32 (VP) or 64 (EDM)
        assert config.query("train.batch_size") % options.tasks_per_node == 0


TINY_IMAGENET_NET = {"UNet.channels": 32, "UNet.emb_channels": 64, "UNet.channel_mult": "(1, 2)",
                     "UNet.num_res_blocks": 1, "UNet.attn_resolutions": "()", "UNet.attn_head_dim": "None"}


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit.script, for the Inception stand-in
def test_tiny_paper_chain_runs_with_dvc(tmp_path):
    """check → reference statistics from the loader → two shared phases → FID over 3 seed ranges → the table,
    through `dvc repro`, with the real ImageNet64 gin file shrunk by row bindings, fake data, a random teacher
    and a TorchScript stand-in for clean-fid's Inception; everything inline on the CPU."""
    import numpy as np
    import torch

    from tract_repro import config
    from tract_repro.diffusion.schedules import CosineSchedule
    from tract_repro.networks.denoiser import build_denoiser

    for item in ("gin", "experiments/runs.yaml"):
        src, dst = ROOT / item, tmp_path / item
        shutil.copytree(src, dst) if src.is_dir() else (dst.parent.mkdir(parents=True, exist_ok=True), shutil.copy(src, dst))
    small = dict(TINY_IMAGENET_NET, **{"Device.name": "'cpu'", "train.threads": 1, "train.batch_size": 8,
                                       "train.grid_size": 4, "TOTAL": "'32'"})
    row = lambda rid, steps: dict(id=rid, label=rid, paper={"value": None}, digits=None,  # noqa: E731
                                  paper_scale=dict(gin="gin/imagenet64_tract.gin", bindings=small, steps=steps))
    table = dict(table="tinypaper", title="Tiny paper-scale chain", paper=dict(dataset="fake", metric="FID", setting="CI"),
                 digits=dict(metric=None, seeds=[]), ordering=dict(claim="none", pairs=[["one", "two"]]),
                 rows=[row("one", 1), row("two", 2)])
    (tmp_path / "experiments" / "tinypaper.yaml").write_text(yaml.safe_dump(table, allow_unicode=True))
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["paper"]["teachers"]["imagenet64_pd"] = "ckpts/imagenet_original.pt"  # a state dict instead of Flax
    params["paper"].update(executor="inline", inception="ckpts/inception-2015-12-05.pt",
                           fid={"samples": 12, "seed-ranges": [0, 12, 24], "protocol": "clean", "batch": 6})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))

    root = tmp_path / "data" / "imagenet64"
    root.mkdir(parents=True)
    g = np.random.default_rng(0)
    np.savez(root / "train_data_batch_1.npz", data=g.integers(0, 256, (40, 12288), dtype=np.uint8),
             labels=g.integers(1, 1001, 40))
    (tmp_path / "ckpts").mkdir()
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        config.parse(["gin/imagenet64_tract.gin"], [f"{k} = {v}" for k, v in small.items()])
        torch.manual_seed(0)
        teacher = build_denoiser(config.build("train.network"), CosineSchedule(), "both")
    finally:
        os.chdir(cwd)
    torch.save(teacher.state_dict(), tmp_path / "ckpts" / "imagenet_original.pt")

    class Layers(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:  # 3 varying features, the rest constant
            means = x.mean(dim=(2, 3))
            return torch.cat([means, torch.zeros(x.shape[0], 2045)], 1)

    class Stub(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = Layers()

        def forward(self, x: torch.Tensor, return_features: bool = True) -> torch.Tensor:
            return self.layers(x)

    torch.jit.script(Stub()).save(str(tmp_path / "ckpts" / "inception-2015-12-05.pt"))

    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}", DVC_NO_ANALYTICS="1",
               TQDM_DISABLE="1", PYTHONPATH=str(ROOT))

    def run(*cmd):
        return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)

    assert run(sys.executable, "-m", "tract_repro.results.pipeline").returncode == 0
    stages = pipeline.load_stages(tmp_path)
    runs = sorted(k for k in stages if k.startswith("paper_run_"))
    assert len(runs) == 2 and sum(k.startswith("paper_eval_") for k in stages) == 1  # both rows: one run, two K
    assert run("git", "init", "-q").returncode == 0 and run("dvc", "init", "-q").returncode == 0
    done = run("dvc", "repro", "tinypaper")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    saved = json.loads((tmp_path / "results" / "paper" / "tinypaper.json").read_text())
    assert set(saved["rows"]) == {"one", "two"}
    for rid, steps in (("one", 1), ("two", 2)):
        r = saved["rows"][rid]
        assert r["steps"] == steps and len(r["fid"]) == 3 and r["protocol"] == "clean" and r["samples_per_range"] == 12
        assert r["seed_ranges"] == [[0, 11], [12, 23], [24, 35]]
    reference = tmp_path / "runs" / "paper" / "fid_ref" / "imagenet64_pd.npz"
    assert saved["rows"]["one"]["reference_sha256"] == check.sha256(reference)
    metrics = json.loads(next((tmp_path / "results" / "paper" / "eval").glob("*/metrics.json")).read_text())
    assert metrics["reference"]["dataset"] == "imagenet64-npz-train" and metrics["inception"]["sha256"]
    text = (tmp_path / "results" / "tinypaper.md").read_text()
    assert "(clean)" in text and "3 seed ranges of 12 samples" in text
    again = run("dvc", "status", "tinypaper")
    assert "paper_run_" not in again.stdout, again.stdout  # nothing to redo but the always-run check
