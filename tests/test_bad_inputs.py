"""Every everyday mistake gets one line that names the fix, a non-zero exit, and loses nothing.

Each case runs one command as a user types it (its ``main``, in this process) inside a workspace that
holds a finished run, its evaluation and the project's experiment files; afterwards the command must
have printed exactly one line (``error: ...``) on stderr, returned the expected status, and left
every file of the workspace byte-identical (nothing written, nothing deleted).
"""
import importlib
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import tiny_gin
from tract_repro import launch

ROOT = Path(__file__).resolve().parents[1]
TEACHER = tiny_gin("train.method = @TeacherTraining()\nTeacherTraining.sample_steps = 8\n"
                   "inference_ema_momentum.momentum = 0.9", total=64)


def tract(teacher="run", extra=""):
    return tiny_gin(f"train.method = @TRACT()\nTRACT.schedule = (64, 8, 1)\ntrain.teacher = '{teacher}'\n"
                    f"inference_ema_momentum.residual = 1e-3\n{extra}", total=64)


@dataclass
class Case:
    name: str
    module: str
    args: list                      # {ws} in an argument is the workspace
    expect: str                     # in the one line
    status: int = 2
    files: dict = field(default_factory=dict)  # extra workspace files: name → text (or bytes)


def flipped(ws):
    data = bytearray((ws / "run" / "ema.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    return bytes(data)


CASES = [
    # --- launch: the configuration
    Case("missing gin file", "launch", ["{ws}/nope.gin"], "gin file {ws}/nope.gin not found"),
    Case("gin syntax error", "launch", ["{ws}/x.gin"], "{ws}/x.gin:", files={"x.gin": "train.total = (1,\n"}),
    Case("unknown parameter", "launch", ["{ws}/t.gin", "--gin", "train.bogus = 1"], "doesn't have a parameter named 'bogus'"),
    Case("unbalanced binding", "launch", ["{ws}/t.gin", "--gin", "train.total = [1"], "--gin 'train.total = [1'"),
    Case("unknown configurable", "launch", ["{ws}/t.gin", "--gin", "train.method = @Nope()"], "Nope"),
    Case("learning rate a word", "launch", ["{ws}/t.gin", "--gin", "adam.lr = 'fast'"], "adam.lr = 'fast'"),
    Case("batch size 0", "launch", ["{ws}/t.gin", "--gin", "train.batch_size = 0"], "train.batch_size = 0"),
    Case("negative batch size", "launch", ["{ws}/t.gin", "--gin", "train.batch_size = -8"], "train.batch_size = -8"),
    Case("negative seed", "launch", ["{ws}/t.gin", "--gin", "train.seed = -1"], "train.seed = -1"),
    Case("no threads", "launch", ["{ws}/t.gin", "--gin", "train.threads = 0"], "train.threads = 0"),
    Case("no micro-batches", "launch", ["{ws}/t.gin", "--gin", "train.accumulate = 0"], "train.accumulate = 0"),
    Case("batch not split", "launch", ["{ws}/t.gin", "--gin", "train.accumulate = 3"], "make train.batch_size a multiple of 3"),
    Case("total under a batch", "launch", ["{ws}/t.gin", "--gin", "train.total = 8"], "at least one batch"),
    Case("bad sample count", "launch", ["{ws}/t.gin", "--gin", "train.total = '9X'"], "invalid sample count '9X'"),
    Case("total and phase lengths", "launch", ["{ws}/t.gin", "--gin", "train.phase_lengths = 64"], "give exactly one of"),
    Case("loss reduction", "launch", ["{ws}/t.gin", "--gin", "train.loss_reduction = 'median'"], "train.loss_reduction"),
    Case("unknown weighting", "launch", ["{ws}/t.gin", "--gin", "TeacherTraining.weighting = 'snr2'"], "unknown loss weighting 'snr2'"),
    Case("unknown parameterisation", "launch", ["{ws}/t.gin", "--gin", "train.parameterisation = 'z'"], "parameterisation"),
    Case("mu_I above 1", "launch", ["{ws}/t.gin", "--gin", "inference_ema_momentum.momentum = 1.5"], "(μ_I) = 1.5"),
    Case("mu_I residual 0", "launch", ["{ws}/d.gin", "--gin", "inference_ema_momentum.residual = 0.0"], "residual"),
    Case("mu_S above 1", "launch", ["{ws}/d.gin", "--gin", "TRACT.self_teacher_momentum = 1.5"], "(μ_S) = 1.5"),
    Case("schedule not dividing", "launch", ["{ws}/d.gin", "--gin", "TRACT.schedule = (64, 48, 1)"], "48 does not divide"),
    Case("schedule increasing", "launch", ["{ws}/d.gin", "--gin", "TRACT.schedule = (8, 64)"], "strictly decreasing"),
    Case("phase reset unknown", "launch", ["{ws}/d.gin", "--gin", "train.phase_reset = ['adam']"], "train.phase_reset"),
    Case("only phase out of range", "launch", ["{ws}/d.gin", "--gin", "train.only_phase = 5"], "train.only_phase = 5"),
    Case("only phase without previous", "launch", ["{ws}/d.gin", "--gin", "train.only_phase = 1"], "set train.previous"),
    Case("previous not a run", "launch", ["{ws}/d.gin", "--gin", "train.only_phase = 1", "--gin", "train.previous = '{ws}'"],
         "is not a run directory"),
    Case("extra EMA twice", "launch", ["{ws}/d.gin", "--gin", "train.extra_inference_emas = [{'residual': 1e-3}]"], "twice"),
    Case("teacher missing", "launch", ["{ws}/d.gin", "--gin", "train.teacher = '{ws}/none'"], "teacher {ws}/none not found"),
    Case("teacher unfinished", "launch", ["{ws}/d.gin", "--gin", "train.teacher = '{ws}/half'"], "is not finished"),
    Case("teacher a text file", "launch", ["{ws}/d.gin", "--gin", "train.teacher = '{ws}/w.pt'"], "cannot be read as a checkpoint",
         files={"w.pt": "not a checkpoint\n"}),
    Case("teacher corrupt", "launch", ["{ws}/d.gin", "--gin", "train.teacher = '{ws}/bad'"], "does not match its sha256"),
    Case("teacher of another net", "launch", ["{ws}/d.gin", "--gin", "UNet.channels = 16"], "does not fit this run's network"),
    Case("teacher parameterisation", "launch", ["{ws}/d.gin", "--gin", "train.parameterisation = 'eps'"], "trained with parameterisation"),
    Case("seeds without {seed}", "launch", ["{ws}/t.gin", "--seeds", "0", "1", "--workdir", "{ws}/s"], "containing {seed}"),
    Case("a different run's folder", "launch", ["{ws}/t.gin", "--gin", "train.seed = 3", "--workdir", "{ws}/run"],
         "holds a run with a different configuration"),
    Case("workdir is a file", "launch", ["{ws}/t.gin", "--workdir", "{ws}/t.gin"], "cannot write the run directory"),
    Case("cuda without a GPU", "launch", ["{ws}/t.gin", "--gin", "train.device = @Device()", "--gin", "Device.name = 'cuda'"],
         "CUDA is not available"),
    Case("autocast unknown", "launch", ["{ws}/t.gin", "--gin", "train.device = @Device()", "--gin", "Device.autocast = 'fp8'"],
         "Device.autocast = 'fp8'"),
    Case("slurm option", "launch", ["{ws}/t.gin", "--executor", "slurm", "--gin", "slurm.tasks_per_node = 0"],
         "slurm.tasks_per_node = 0"),
    Case("local executor option", "launch", ["{ws}/t.gin", "--executor", "local", "--gin", "local_executor.tasks_per_node = 0"],
         "local_executor.tasks_per_node = 0"),
    # --- evaluate
    Case("evaluate a missing run", "evaluate", ["{ws}/none"], "is not a run directory"),
    Case("evaluate an unfinished run", "evaluate", ["{ws}/half"], "finish it with `python -m tract_repro.launch {ws}/half/config.gin"),
    Case("evaluate no workers", "evaluate", ["{ws}/run", "--workers", "0"], "--workers 0"),
    Case("evaluate no samples", "evaluate", ["{ws}/run", "--samples", "0"], "--samples 0"),
    Case("evaluate zero steps", "evaluate", ["{ws}/run", "--steps", "0"], "--steps 0"),
    Case("evaluate outs mismatch", "evaluate", ["{ws}/run", "--out", "{ws}/a.json", "{ws}/b.json"], "one --out per run"),
    Case("evaluate steps not dividing", "evaluate", ["{ws}/run", "--steps", "3", "--classifier", "{ws}/nocls"], "do not divide T"),
    Case("evaluate without classifier", "evaluate", ["{ws}/run", "--classifier", "{ws}/nocls"], "digits classifier"),
    Case("evaluate a corrupt ema.pt", "evaluate", ["{ws}/bad"], "does not match its sha256"),
    # --- fid
    Case("fid reference missing", "evaluation.fid", ["evaluate", "{ws}/run", "--steps", "1", "--reference", "{ws}/r.npz"],
         "not found"),
    Case("fid imagenet without root", "evaluation.fid", ["reference", "imagenet64", "--out", "{ws}/r.npz"], "needs --root"),
    # --- import_teacher
    Case("import without weights", "import_teacher", ["{ws}/t.gin", "--workdir", "{ws}/new"], "bind import_teacher.weights"),
    Case("import a text file", "import_teacher", ["{ws}/t.gin", "--gin", "import_teacher.weights = '{ws}/w.pt'",
                                                  "--workdir", "{ws}/new"], "cannot be read", files={"w.pt": "text\n"}),
    Case("import into a run", "import_teacher", ["{ws}/t.gin", "--gin", "import_teacher.weights = '{ws}/run/ema.pt'",
                                                 "--workdir", "{ws}/run"], "already holds files"),
    # --- export
    Case("export into a non-empty folder", "export", ["{ws}/run", "--out", "{ws}/run"], "is not empty: choose a new folder"),
    Case("export an unfinished run", "export", ["{ws}/half", "--out", "{ws}/new"], "finish it with `python -m tract_repro.launch"),
    Case("export a non-evaluation", "export", ["{ws}/run", "--out", "{ws}/new", "--metrics", "{ws}/m.json"],
         "not an evaluation file", files={"m.json": "{}\n"}),
    # --- classifier, results
    Case("classifier binding", "evaluation.classifier", ["--workdir", "{ws}/cls", "--gin", "train_classifier.bogus = 1"], "bogus"),
    Case("tables unknown table", "results.tables", ["nope"], "no experiments/nope.yaml"),
    Case("pipeline malformed params", "results.pipeline", [], "params.yaml is not valid YAML", files={"params.yaml": "digits: [\n"}),
    Case("pipeline no digits section", "results.pipeline", [], "no 'digits:' section", files={"params.yaml": "paper: {}\n"}),
    Case("run_stages bad --set", "results.run_stages", ["table1", "--set", "budget"], "--set 'budget'"),
    Case("check missing inputs", "results.check", ["cifar10_pd", "--data", "{ws}/d", "--teacher", "{ws}/t", "--inception",
                                                   "{ws}/i", "--out", "{ws}/o"], "missing paper-scale inputs"),
]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A workspace: a finished teacher run, an unfinished one, a corrupt one, run files and the project's tables."""
    ws = tmp_path_factory.mktemp("workspace")
    (ws / "t.gin").write_text(TEACHER)
    assert launch.main([str(ws / "t.gin"), "--workdir", str(ws / "run")]) == 0
    (ws / "d.gin").write_text(tract(str(ws / "run")))
    shutil.copytree(ws / "run", ws / "half")
    for name in ("ema.pt", "ema.pt.sha256"):
        (ws / "half" / name).unlink()
    shutil.copytree(ws / "run", ws / "bad")
    (ws / "bad" / "ema.pt").write_bytes(flipped(ws))
    for name in ("experiments", "gin", "pipelines"):
        shutil.copytree(ROOT / name, ws / name)
    shutil.copy(ROOT / "params.yaml", ws / "params.yaml")
    return ws


def snapshot(ws):
    return {str(p.relative_to(ws)): p.read_bytes() for p in sorted(ws.rglob("*")) if p.is_file()}


def test_there_are_at_least_forty_cases_over_every_command():
    assert len(CASES) >= 40 and len({c.name for c in CASES}) == len(CASES)
    assert {c.module for c in CASES} >= {"launch", "evaluate", "evaluation.fid", "import_teacher", "evaluation.classifier",
                                         "results.pipeline", "results.tables"}


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_a_bad_input_is_one_line_and_loses_nothing(case, base, tmp_path, capsys, monkeypatch):
    ws = tmp_path / "ws"
    shutil.copytree(base, ws, symlinks=True)
    for name, text in case.files.items():
        (ws / name).write_bytes(text.encode() if isinstance(text, str) else text)
    for name in ("d.gin",):  # its teacher is this workspace's run
        (ws / name).write_text((base / name).read_text().replace(str(base), str(ws)))
    monkeypatch.chdir(ws)
    monkeypatch.delenv("TRACT_TRACEBACK", raising=False)
    before = snapshot(ws)
    main = importlib.import_module(f"tract_repro.{case.module}").main
    status = main([a.replace("{ws}", str(ws)) for a in case.args])
    err = capsys.readouterr().err
    assert status == case.status, err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    assert case.expect.replace("{ws}", str(ws)) in err, err
    after = snapshot(ws)
    assert after.keys() == before.keys(), sorted(after.keys() ^ before.keys())
    assert [k for k in before if before[k] != after[k]] == []


@pytest.mark.parametrize("gin_file", sorted(p.name for p in (ROOT / "gin").glob("digits_*.gin")))
def test_a_runs_saved_config_relaunches_it(gin_file, tmp_path):
    """What an unfinished run's error suggests is true: its config.gin, launched, is the same configuration
    (so the launcher resumes the run instead of refusing its folder)."""
    from tract_repro import config

    text = config.parse([str(ROOT / "gin" / gin_file)])
    (tmp_path / "config.gin").write_text(text)
    assert config.parse([str(tmp_path / "config.gin")]) == text
