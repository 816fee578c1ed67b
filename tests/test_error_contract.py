"""The error contract for four inputs that once broke it: each gets one line that names the fix, a non-zero exit,
and nothing written, lost or overwritten.

1. an FID reference that is not a reference-statistics .npz (a text file, an .npz without mu and sigma);
2. ``--seeds`` that are not whole numbers ≥ 0 (checked before any run directory or launch.log exists);
3. a diverged run: run.json says "failed" with the reason, and the advice it prints works (a failed run without
   checkpoints restarts in its --workdir with a lower learning rate; one with checkpoints names a new --workdir);
4. gin bindings that gin itself reports without naming them or the fix.

The commands a user types run as subprocesses; their variants run ``main`` in this process (as
tests/test_bad_inputs.py does), which checks the same line, status and files in a fraction of the time.
"""
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import tiny_gin
from tract_repro.common.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
TEACHER = tiny_gin("train.method = @TeacherTraining()\nTeacherTraining.sample_steps = 8\n"
                   "inference_ema_momentum.momentum = 0.9", total=64)


def command(ws, module, *args):
    """``python -m tract_repro.<module> ARGS`` in the workspace, as a user types it (no traceback switch, no warm server)."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRACT_TRACEBACK", "TRACT_WARM")}
    env.update(TQDM_DISABLE="1", PYTHONPATH=os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p]))
    return subprocess.run([sys.executable, "-m", f"tract_repro.{module}", *map(str, args)], cwd=ws, env=env,
                          capture_output=True, text=True, timeout=300)


def in_process(module, args, capsys, monkeypatch):
    """(status, stderr) of the command's ``main`` run in this process."""
    monkeypatch.delenv("TRACT_TRACEBACK", raising=False)
    status = importlib.import_module(f"tract_repro.{module}").main([str(a) for a in args])
    return status, capsys.readouterr().err


def one_line(err, status, expected_status, *expect):
    assert status == expected_status, err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    for text in expect:
        assert text in err, (text, err)


def snapshot(ws):
    """Every path under ``ws`` (folders too) with its bytes: what a failed command must leave as it was."""
    return {str(p.relative_to(ws)): (p.read_bytes() if p.is_file() else None) for p in sorted(ws.rglob("*"))}


@pytest.fixture
def ws(tmp_path, monkeypatch):
    """A workspace holding a tiny run configuration, a text file and a few .npz files that are not statistics."""
    (tmp_path / "t.gin").write_text(TEACHER)
    (tmp_path / "notes.txt").write_text("mu and sigma, to do\n")
    np.savez(tmp_path / "keys.npz", mean=np.zeros(3), cov=np.eye(3))
    np.save(tmp_path / "one.npy", np.zeros(3))
    np.savez(tmp_path / "objects.npz", mu=np.zeros(2), sigma=np.eye(2), dataset=np.array([{"a": 1}], dtype=object))
    np.savez(tmp_path / "shapes.npz", mu=np.zeros((2, 2)), sigma=np.eye(2))
    (tmp_path / "torn.npz").write_bytes((tmp_path / "keys.npz").read_bytes()[:60])
    monkeypatch.chdir(tmp_path)
    return tmp_path


# ------------------------------------------------------------------------------------- 1. FID references

def test_a_text_file_as_fid_reference_is_one_line(ws):
    before = snapshot(ws)
    done = command(ws, "evaluation.fid", "evaluate", "RUN", "--steps", "1", "--reference", "notes.txt")
    one_line(done.stderr, done.returncode, 2, "notes.txt is not a reference-statistics .npz",
             "python -m tract_repro.evaluation.fid reference")
    assert snapshot(ws) == before


@pytest.mark.parametrize("name, expect", [("keys.npz", "holds ['cov', 'mean'], not mu and sigma"),
                                          ("one.npy", "not a reference-statistics .npz"),
                                          ("objects.npz", "not a reference-statistics .npz"),  # never unpickled
                                          ("shapes.npz", "are not a mean and its covariance"),
                                          ("torn.npz", "not a reference-statistics .npz")])
def test_an_npz_that_is_not_statistics_is_one_line(name, expect, ws, capsys, monkeypatch):
    before = snapshot(ws)
    status, err = in_process("evaluation.fid", ["evaluate", "RUN", "--steps", "1", "--reference", name], capsys, monkeypatch)
    one_line(err, status, 2, f"{name}", expect, "python -m tract_repro.evaluation.fid reference")
    status, err = in_process("evaluation.fid", ["reference", "cifar10", "--source", "file", "--file", name,
                                                "--out", "ref.npz"], capsys, monkeypatch)
    one_line(err, status, 2, f"{name}", expect, "give published statistics with mu and sigma")
    assert snapshot(ws) == before  # no ref.npz either


def test_an_object_array_is_refused_unread(ws, monkeypatch):
    """allow_pickle=False: the object array's pickle is never loaded (a pickle can run code)."""
    import pickle

    from tract_repro.evaluation.references import load_reference

    monkeypatch.setattr(pickle, "loads", lambda *a, **k: pytest.fail("a pickle was loaded"))
    with pytest.raises(ConfigError, match="Object arrays cannot be loaded"):
        load_reference(ws / "objects.npz")


# ------------------------------------------------------------------------------------------- 2. --seeds

def test_a_negative_seed_is_one_line_before_anything_is_written(ws):
    before = snapshot(ws)
    done = command(ws, "launch", "t.gin", "--seeds", "-1", "--workdir", "runs/s{seed}")
    one_line(done.stderr, done.returncode, 2, "--seeds -1: give whole numbers, at least 0")
    assert snapshot(ws) == before and not (ws / "runs").exists()


@pytest.mark.parametrize("seeds, expect", [(["1.5"], "--seeds 1.5: give whole numbers"), (["x"], "--seeds x: give whole"),
                                           (["0", "-3"], "--seeds -3: give whole"),
                                           (["0", "0"], "seed 0 is given twice: give each seed once")])
def test_seeds_are_whole_numbers_at_least_zero(seeds, expect, ws, capsys, monkeypatch):
    before = snapshot(ws)
    status, err = in_process("launch", ["t.gin", "--seeds", *seeds, "--workdir", "runs/s{seed}"], capsys, monkeypatch)
    one_line(err, status, 2, expect)
    assert snapshot(ws) == before


@pytest.mark.parametrize("binding, expect", [("train.batch_size = 0", "train.batch_size = 0: give a whole number"),
                                             ("train.loss_reduction = 'max'", "train.loss_reduction = 'max': choose")])
def test_options_of_forked_seeds_are_checked_before_anything_is_written(binding, expect, ws, capsys, monkeypatch):
    """A run's options are checked in the launcher, not in each forked seed after its directory exists."""
    before = snapshot(ws)
    status, err = in_process("launch", ["t.gin", "--gin", binding, "--seeds", "0", "1", "--workdir", "runs/s{seed}"],
                             capsys, monkeypatch)
    one_line(err, status, 2, expect)
    assert snapshot(ws) == before and not (ws / "runs").exists()


# ---------------------------------------------------------------------------------------- 3. a diverged run

def test_a_diverged_run_fails_in_one_line_and_its_advice_works(ws):
    done = command(ws, "launch", "t.gin", "--gin", "adam.lr = 1e30", "--workdir", "run")
    one_line(done.stderr, done.returncode, 1, "the loss became non-finite", "lower the learning rate (e.g. --gin 'adam.lr",
             "then launch again: a failed run without checkpoints restarts in run")
    info = json.loads((ws / "run" / "run.json").read_text())
    assert info["status"] == "failed" and info["error"] == done.stderr.strip()[len("error: "):]
    assert not (ws / "run" / "ema.pt").exists() and not list((ws / "run").glob("checkpoints/*"))

    done = command(ws, "launch", "t.gin", "--gin", "adam.lr = 1e-3", "--workdir", "run")  # as the line says
    assert done.returncode == 0, done.stderr
    info = json.loads((ws / "run" / "run.json").read_text())
    assert info["status"] == "complete" and "error" not in info and (ws / "run" / "ema.pt").is_file()
    assert "adam.lr = 0.001" in (ws / "run" / "config.gin").read_text()
    records = [json.loads(line) for line in (ws / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["samples"] for r in records] == [64] and np.isfinite(records[0]["loss"])  # none of the failed run's


def test_a_run_that_diverges_after_a_checkpoint_names_a_new_workdir(ws, capsys, monkeypatch):
    """The learning rate warms up from 0, so the run checkpoints after its first step and diverges later: the
    same --workdir would resume the diverging run, so the line names a new one (and that folder stays refused)."""
    slow = ["--gin", "adam.lr = 1e30", "--gin", "learning_rate.warmup = 64", "--gin", "train.checkpoint_every = 16"]
    status, err = in_process("launch", ["t.gin", *slow, "--workdir", "run"], capsys, monkeypatch)
    one_line(err, status, 1, "the loss became non-finite", "launch it with a new --workdir (run keeps the checkpoints",
             "or delete run to start over")
    assert list((ws / "run" / "checkpoints").glob("ckpt_*.pt"))
    assert json.loads((ws / "run" / "run.json").read_text())["status"] == "failed"
    before = snapshot(ws)
    status, err = in_process("launch", ["t.gin", "--workdir", "run"], capsys, monkeypatch)
    one_line(err, status, 2, "run holds a run with a different configuration: pass a new --workdir")
    assert snapshot(ws) == before


@pytest.mark.parametrize("status, checkpoint, restarts", [("failed", False, True), ("failed", True, False),
                                                          ("running", False, False), ("complete", False, False)])
def test_only_a_failed_run_without_checkpoints_takes_a_new_configuration(status, checkpoint, restarts, tmp_path):
    from tract_repro.launching.jobs import check_workdir

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.gin").write_text("adam.lr = 1e30\n")
    (run / "run.json").write_text(json.dumps(dict(status=status)))
    if checkpoint:
        (run / "checkpoints" / "ckpt_000000000016.pt").write_bytes(b"x")
    if restarts:
        assert check_workdir(run, "adam.lr = 1e-4\n") is None
    else:
        with pytest.raises(ConfigError, match="holds a run with a different configuration"):
            check_workdir(run, "adam.lr = 1e-4\n")


# ---------------------------------------------------------------------------------------------- 4. gin

@pytest.mark.parametrize("binding, expect", [
    ("%NOPE", "--gin '%NOPE': not a binding: define the macro with 'NOPE = ...'"),
    ("train.seed = %NOPE", "--gin 'train.seed = %NOPE': undefined macro %NOPE: define it with --gin 'NOPE = ...'"),
])
def test_a_broken_binding_names_itself_and_the_fix(binding, expect, ws):
    before = snapshot(ws)
    done = command(ws, "launch", "t.gin", "--gin", binding, "--workdir", "x")
    one_line(done.stderr, done.returncode, 2, expect)
    assert snapshot(ws) == before


@pytest.mark.parametrize("binding, expect", [
    ("train.seed = [1", "--gin 'train.seed = [1': unbalanced brackets or quotes: close every bracket and quote"),
    ("train.batch_size = ((", "--gin 'train.batch_size = ((': unbalanced brackets or quotes"),
    ("NOPE/gin.macro = 1", "--gin 'NOPE/gin.macro = 1': No configurable matching 'gin': to define a macro write "
                           "'NOPE = ...'"),
    ("train.seed = @@", "--gin 'train.seed = @@': cannot parse the value '@@': give a number, a 'quoted string'"),
    ("train.seed = )", "--gin 'train.seed = )': cannot parse the value ')'"),
    ("train.seed = {1 2}", "--gin 'train.seed = {1 2}': cannot parse the value '{1 2}'"),
    ("train.seed = 1 2", "--gin 'train.seed = 1 2': unexpected text after the value: give one binding per --gin"),
    ("= 1", "--gin '= 1': not a binding: a binding is 'configurable.parameter = value'"),
    ("NOPE", "--gin 'NOPE': not a binding: a binding is 'configurable.parameter = value'"),
    ("adam.lr = %LR2", "--gin 'adam.lr = %LR2': undefined macro %LR2: define it with --gin 'LR2 = ...'"),
    ("tran.seed = 1", "--gin 'tran.seed = 1': No configurable matching 'tran': did you mean 'train'?"),
    ("train.sead = 1", "doesn't have a parameter named 'sead': did you mean 'train.seed'?"),
    ("train.method = @TeacherTrainin()", "did you mean @TeacherTraining?"),
    ("import nope", "--gin 'import nope': No module named 'nope': install the module or remove the import"),
])
def test_every_broken_binding_names_itself_and_the_fix(binding, expect, ws, capsys, monkeypatch):
    before = snapshot(ws)
    status, err = in_process("launch", ["t.gin", "--gin", "SEED = 0", "--gin", binding, "--workdir", "x"], capsys,
                             monkeypatch)
    one_line(err, status, 2, expect)
    assert snapshot(ws) == before


def test_an_undefined_macro_in_an_included_file_names_its_line(ws, capsys, monkeypatch):
    (ws / "parts").mkdir()
    (ws / "parts" / "grid.gin").write_text("# the sample grids\ntrain.grid_scale = %SCALE\n")
    (ws / "r.gin").write_text(TEACHER + "include 'parts/grid.gin'\n")
    (ws / "v.gin").write_text(TEACHER + "train.seed = @@\n")
    line = (ws / "v.gin").read_text().splitlines().index("train.seed = @@") + 1
    before = snapshot(ws)
    status, err = in_process("launch", ["r.gin", "--workdir", "x"], capsys, monkeypatch)
    one_line(err, status, 2, f"{Path('parts') / 'grid.gin'}:2: undefined macro %SCALE: define it with --gin 'SCALE = ...'")
    status, err = in_process("launch", ["v.gin", "--workdir", "x"], capsys, monkeypatch)
    one_line(err, status, 2, f"v.gin:{line}: cannot parse the value '@@'")
    assert snapshot(ws) == before
