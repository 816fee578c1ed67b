"""Paper-scale gin files: every one that experiments/*.yaml names exists, parses with each row's
bindings, and builds the published network (on the meta device: no memory, no weights)."""
import re
from pathlib import Path

import pytest
import torch
import yaml

from tract_repro import config
from tract_repro.methods.phases import plan_phases
from tract_repro.common.lengths import parse_samples

ROOT = Path(__file__).resolve().parents[1]

# Published parameter counts (ml-tract-notes §2.1, edm-notes §2.6 and §3.5).
PD_CIFAR10, PD_IMAGENET64 = 60_004_099, 295_905_222
EDM_CIFAR10_NO_AUGMENT, EDM_IMAGENET64 = 56_395_523, 295_899_267
EXPECTED = {
    "gin/cifar10_teacher.gin": PD_CIFAR10,
    "gin/cifar10_tract.gin": PD_CIFAR10,
    "gin/cifar10_btd.gin": PD_CIFAR10,
    "gin/cifar10_tract_edm.gin": EDM_CIFAR10_NO_AUGMENT,
    "gin/imagenet64_tract.gin": PD_IMAGENET64,
    "gin/imagenet64_2phase.gin": PD_IMAGENET64,
    "gin/imagenet64_btd.gin": PD_IMAGENET64,
    "gin/imagenet64_tract_edm.gin": EDM_IMAGENET64,
}
#: latent run files: the network is the user's diffusers folder (MODEL), so its size is the folder's, not a count here;
#: by setup, the folder and the encoded training shards they read
LATENT_SETUPS = {"sd15": ("ckpts/stable-diffusion-v1-5", "runs/paper/latents/sd15_train"),
                 "imagenet256": ("ckpts/DiT-XL-2-256", "runs/paper/latents/imagenet256_train")}
LATENT_RUN_FILES = {f"gin/{p.name}": setup for setup in LATENT_SETUPS for p in (ROOT / "gin").glob(f"{setup}_*.gin")}


def paper_rows():
    """Every paper-scale row's spec; a row that evaluates a run the pipeline trains (``run:``, guided distillation)
    gets that run's gin file and bindings from its table's ``paper_runs``."""
    for path in sorted((ROOT / "experiments").glob("*.yaml")):
        table = yaml.safe_load(path.read_text())
        if path.stem == "runs":
            continue
        for row in table["rows"]:
            spec = row.get("paper_scale")
            if spec:
                if spec.get("run"):
                    spec = dict(spec, **table["paper_runs"][spec["run"]])
                yield pytest.param(spec, id=f"{path.stem}:{row['id']}")


def expected_count(gin_file):
    """The published parameter count, or for a guided run file the PD network with a ∅ row (and a w branch)."""
    if "_guided_" not in gin_file:
        return EXPECTED[gin_file]
    dataset, stage = re.fullmatch(r"gin/(\w+?)_guided_(\w+)\.gin", gin_file).groups()
    base, classes_before, classes, second_head = GUIDED[dataset]
    C, E = config.query("UNet.channels"), config.query("UNet.emb_channels")
    teacher = base - second_head - (classes_before * E + E if classes_before > 1 else 0) + (classes + 1) * E + E
    return teacher + (0 if stage == "teacher" else C * E + E + E * E + E)


@pytest.fixture
def in_repo(monkeypatch):
    monkeypatch.chdir(ROOT)


def test_every_paper_gin_file_has_an_expected_parameter_count():
    named = {spec.values[0]["gin"] for spec in paper_rows()} - {f"gin/{d}_guided_{s}.gin" for d in GUIDED
                                                                 for s in ("teacher", "stage1", "tract", "btd")} \
        - set(LATENT_RUN_FILES)
    assert named <= set(EXPECTED), f"add the parameter count of {sorted(named - set(EXPECTED))} here"
    assert all((ROOT / f).is_file() for f in EXPECTED)


@pytest.mark.parametrize("spec", list(paper_rows()))
def test_paper_row_parses_and_builds_its_network(spec, in_repo):
    bindings = [f"{k} = {v}" for k, v in sorted(spec.get("bindings", {}).items())]
    assert Path(spec["gin"]).is_file(), f"{spec['gin']} is missing"
    config.parse([spec["gin"]], bindings)
    assert config.query("Device.name") == "cuda"
    if spec["gin"] in LATENT_RUN_FILES:  # Stable Diffusion, DiT: the folder's network, in bf16 autocast as they are trained
        folder, shards = LATENT_SETUPS[LATENT_RUN_FILES[spec["gin"]]]
        assert config.query("diffusers_network.folder") == folder and config.query("latents.folder") == shards
        assert config.query("Device.autocast") == "bf16" and config.query("diffusers_network.gradient_checkpointing")
    else:
        with torch.device("meta"):
            net = config.build("train.network")
        assert sum(p.numel() for p in net.parameters()) == expected_count(spec["gin"])
        assert not config.query("Device.tf32") and config.query("Device.autocast") is None
    assert not config.query("Device.channels_last")
    method = config.build("train.method")
    steps = method.steps(config.query("train.T", 1024))
    if method.needs_teacher:
        phases = plan_phases(steps, config.query("train.total"), config.query("train.phase_lengths"))
        assert all(p.length >= config.query("train.batch_size") for p in phases)
        assert spec.get("phase", len(phases) - 1) < len(phases)
        assert config.query("train.teacher") and config.query("train.dataset") is not None
    if spec.get("sampler") == "stochastic":  # trained for it: the last phase jumps 2/N from every level of N = 2·S_P
        assert method.stochastic and spec["steps"] == 2 * steps[-1] and spec.get("phase", len(steps) - 2) == len(steps) - 2
    T = config.query("train.T", 1024)
    assert T % spec["steps"] == 0, f"{spec['steps']} evaluation steps do not divide T = {T}"


RUN_FILES = sorted(p for p in (ROOT / "gin").glob("*.gin") if not p.name.startswith("digits"))


@pytest.mark.parametrize("path", RUN_FILES, ids=[p.name for p in RUN_FILES])
def test_run_files_declare_their_macros_first(path):
    """t5x style: the run-level file opens with its required macros (or includes a file that does)."""
    lines = [ln for ln in path.read_text().splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    if lines[0].startswith("include "):  # a variant of another run file, e.g. imagenet64_2phase.gin
        included = ROOT / "gin" / lines[0].split(None, 1)[1].strip("'\"")
        assert included.name in {p.name for p in RUN_FILES}
        return
    first_include = next(i for i, ln in enumerate(lines) if ln.startswith("include "))
    declared = [ln.split("=")[0].strip() for ln in lines[:first_include]]
    assert declared and all(re.fullmatch(r"[A-Z][A-Z0-9_]*", name) for name in declared), declared
    used = set(re.findall(r"%([A-Z][A-Z0-9_]*)", "\n".join(_with_includes(path))))
    assert used <= set(declared), f"{path.name} uses {sorted(used - set(declared))} without declaring them"
    for name in ("SEED", "LR", "DATA"):
        assert name in declared


def _with_includes(path):
    text = path.read_text()
    out = [text]
    for line in text.splitlines():
        if line.startswith("include "):
            out += _with_includes(ROOT / "gin" / line.split(None, 1)[1].strip("'\""))
    return out


def test_imagenet64_2phase_is_the_two_phase_1024_32_1_run(in_repo):
    config.parse(["gin/imagenet64_2phase.gin"])
    method = config.build("train.method")
    phases = plan_phases(method.steps(1024), config.query("train.total"), config.query("train.phase_lengths"))
    assert [(p.teacher_steps, p.student_steps) for p in phases] == [(1024, 32), (32, 1)]
    assert [p.length for p in phases] == [parse_samples("48M")] * 2
    assert config.query("train.parameterisation") == "both" and config.query("UNet.num_classes") == 1000
    assert config.query("train.loss_reduction") == "sum" and config.query("train.batch_size") == 256


def test_official_settings(in_repo):
    """batch 256 / Adam 2e-4 / μ_S 0.5 / μ_I from residual 1e-3 / summed truncated-SNR loss (VP);
    batch 512 / Adam 1e-3 / no clipping / per-sample mean (CIFAR-10 EDM, the official example)."""
    config.parse(["gin/cifar10_tract.gin"])
    assert (config.query("train.batch_size"), config.query("adam.lr"), config.query("TRACT.self_teacher_momentum")) \
        == (256, 2e-4, 0.5)
    assert config.query("inference_ema_momentum.momentum") is None
    assert config.query("inference_ema_momentum.residual") == 1e-3
    assert (config.query("train.loss_reduction"), config.query("train.grad_clip")) == ("sum", 1.0)
    assert config.query("UNet.dropout") == 0.0 and config.query("train.parameterisation") == "x"
    config.parse(["gin/cifar10_tract_edm.gin"])
    assert (config.query("train.batch_size"), config.query("adam.lr"), config.query("train.grad_clip")) == (512, 1e-3, 0)
    assert config.query("train.loss_reduction") == "mean" and config.query("TRACT.schedule") == (40, 1)
    assert config.query("edm_cifar10_ve.dropout") == 0.0
    config.parse(["gin/cifar10_btd.gin"], ["START_STEPS = 8192"])
    assert config.query("train.T") == 8192 and len(config.build("train.method").steps(8192)) == 14


def test_importing_a_teacher_makes_a_finished_run(tmp_path):
    """import_teacher writes ema.pt/config.gin/run.json from a weights file; the evaluation can load it."""
    from tests.conftest import TINY_NET
    from tract_repro import import_teacher
    from tract_repro.evaluation.runs import load_run
    from tract_repro.networks.denoiser import build_denoiser
    from tract_repro.diffusion.schedules import CosineSchedule
    from tract_repro.networks.unet import UNet

    config.parse(text=TINY_NET)
    torch.manual_seed(3)
    teacher = build_denoiser(UNet(), CosineSchedule(), "x")
    torch.save(teacher.state_dict(), tmp_path / "teacher.pt")
    gin_file = tmp_path / "teacher.gin"
    gin_file.write_text(TINY_NET + "\ntrain.dataset = @digits\ntrain.network = @UNet\ntrain.parameterisation = 'x'\n"
                        f"import_teacher.weights = '{tmp_path / 'teacher.pt'}'\n")
    assert import_teacher.main([str(gin_file), "--workdir", str(tmp_path / "run")]) == 0
    run = load_run(tmp_path / "run", with_data=False)
    assert run.info["status"] == "complete" and run.info["method"] == "ImportedTeacher"
    for name, value in teacher.state_dict().items():
        assert torch.equal(run.denoiser.state_dict()[name], value)
    assert import_teacher.main([str(gin_file), "--workdir", str(tmp_path / "run")]) == 0  # idempotent
    gin_file.write_text(gin_file.read_text().replace("teacher.pt", "missing.pt"))
    assert import_teacher.main([str(gin_file), "--workdir", str(tmp_path / "other")]) == 2


# (PD network's parameters, its classes, the guided network's classes, the parameters of the x-and-ε network's second
# output head, which a v-predicting guided network drops: a 3×3 convolution from 192 channels to 3, with bias)
GUIDED = {"cifar10": (PD_CIFAR10, 1, 10, 0), "imagenet64": (PD_IMAGENET64, 1000, 1000, 192 * 9 * 3 + 3)}
TEACHER_DROPOUT = {"cifar10": 0.2, "imagenet64": 0.1}  # the Google PD teachers' own configurations


@pytest.mark.parametrize("dataset", sorted(GUIDED))
def test_guided_run_files_build_the_teachers_network_with_a_null_class_and_a_w_input(dataset, in_repo):
    """The guided teacher is the PD network with a class embedding that has a row for ∅; the stage-1 and
    stage-2 students add the w branch (an MLP C → E → E) and nothing else; each run file parses."""
    base, classes_before, classes, second_head = GUIDED[dataset]
    counts = {}
    for stage in ("teacher", "stage1", "tract", "btd"):
        config.parse([f"gin/{dataset}_guided_{stage}.gin"])
        with torch.device("meta"):
            net = config.build("train.network")
        counts[stage] = sum(p.numel() for p in net.parameters())
        method = config.build("train.method")
        assert net.null_class and net.num_classes == classes
        assert ("w" in net.extra_conditions) == (stage != "teacher")
        assert (getattr(method, "p_uncond", 0) > 0) == (stage == "teacher")
        assert method.w_range in (None, (0.0, 4.0))
        # the paper's recipe: v prediction, the PD teacher's dropout, each halving's student started from its teacher
        assert config.query("train.parameterisation") == "v" and net.num_outputs == 1
        assert config.query("UNet.dropout") == (TEACHER_DROPOUT[dataset] if stage == "teacher" else 0.0)
        assert list(config.query("train.phase_reset") or []) == (["student"] if stage in ("tract", "btd") else [])
        assert getattr(method, "clip", False) is False  # one rule for guided stage 2: unclipped targets
    C, E = config.query("UNet.channels"), config.query("UNet.emb_channels")
    old_class_params = classes_before * E + E if classes_before > 1 else 0
    assert counts["teacher"] == base - second_head - old_class_params + (classes + 1) * E + E
    w_branch = C * E + E + E * E + E
    assert counts["stage1"] == counts["tract"] == counts["btd"] == counts["teacher"] + w_branch


def test_guided_paper_tables_state_each_rows_training_samples(in_repo):
    """TRACT and BTD rows side by side with their stage-2 samples: BTD to k steps trains log2(1024/k) halvings of
    48M, TRACT 1024→32→k two phases of 48M, the stochastic student one halving more than its deterministic chain."""
    from tract_repro.common.lengths import format_samples, parse_samples
    from tract_repro.results.experiments import load_tables
    from tract_repro.results.guided_paper import training_samples

    assert all(format_samples(parse_samples(s)) == s for s in ("96M", "1.5M", "200K", "4K", "123"))
    table = load_tables()["guided_imagenet64"]
    samples = {row["id"]: training_samples(row["paper_scale"], table) for row in table["rows"]}
    for k, halvings in ((8, 7), (4, 8), (2, 9)):
        assert samples[f"btd_{k}steps"] == f"{48 * halvings}M (stage 2)"
        assert samples[f"btd_stochastic_{k}steps"] == f"{48 * halvings + 48}M (stage 2)"
        assert samples[f"tract_{k}steps"] == "96M (stage 2)"
    assert samples["teacher_64"] == "400M" and samples["stage1_64"] == "24M"
