"""The launcher and the run directory: one-line errors, the files a run writes, phase boundaries."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import tiny_gin
from tract_repro import launch
from tract_repro.training import checkpoint as ckpt

TEACHER = tiny_gin("train.method = @TeacherTraining()\nTeacherTraining.sample_steps = 8\n"
                   "inference_ema_momentum.momentum = 0.9\nlearning_rate.warmup = 64", total=512)


def tract(teacher, schedule=(64, 8, 1), total=512, extra=""):
    return tiny_gin(f"train.method = @TRACT()\nTRACT.schedule = {schedule}\ntrain.teacher = '{teacher}'\n"
                    f"inference_ema_momentum.residual = 1e-3", total=total, extra=extra)


def write(path, text):
    path.write_text(text)
    return str(path)


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    """A tiny trained teacher, shared by the tests of this module."""
    root = tmp_path_factory.mktemp("teacher")
    assert launch.main([write(root / "teacher.gin", TEACHER), "--workdir", str(root / "run")]) == 0
    return root / "run"


def test_run_directory_describes_itself(teacher_run):
    files = {p.name for p in teacher_run.iterdir()}
    assert {"config.gin", "operative_config.gin", "run.json", "metrics.jsonl", "checkpoints", "samples", "ema.pt"} <= files
    info = json.loads((teacher_run / "run.json").read_text())
    assert info["status"] == "complete" and info["samples"] == 512 and info["method"] == "TeacherTraining"
    operative = (teacher_run / "operative_config.gin").read_text()
    assert "train.batch_size = 16" in operative and "UNet.channels = 8" in operative
    assert "adam.betas = (0.9, 0.999)" in operative  # defaults are recorded too
    assert "learning_rate.warmup = 64" in operative  # configurables first called inside the loop too
    records = [json.loads(line) for line in (teacher_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["samples"] for r in records] == [64 * k for k in range(1, 9)]
    assert all(r["loss"] > 0 for r in records)
    assert (teacher_run / "samples" / "final_8steps.png").stat().st_size > 0
    state = torch.load(teacher_run / "ema.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def test_a_finished_run_is_not_rerun_or_overwritten(teacher_run, capsys):
    before = (teacher_run / "ema.pt").stat().st_mtime_ns
    assert launch.main([str(teacher_run / "config.gin"), "--workdir", str(teacher_run)]) == 0
    assert "already complete" in capsys.readouterr().out
    assert (teacher_run / "ema.pt").stat().st_mtime_ns == before


def test_a_different_config_in_the_same_workdir_is_refused(teacher_run, tmp_path, capsys):
    other = write(tmp_path / "other.gin", TEACHER.replace("adam.lr = 1e-3", "adam.lr = 5e-4"))
    before = (teacher_run / "config.gin").read_text()
    assert launch.main([other, "--workdir", str(teacher_run)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "different configuration" in err and "\n" not in err
    assert (teacher_run / "config.gin").read_text() == before


@pytest.mark.parametrize("text,where,what", [
    ("train.batch_size = 16\ntrain.total = (1,\n", "bad.gin:2", "unbalanced"),
    ("train.batch_size = 16\n\ntrain.bogus = 3\n", "bad.gin:3", "doesn't have a parameter named 'bogus'"),
    ("nothing.here = 3\n", "bad.gin:1", "No configurable matching 'nothing'"),
    ("train.batch_size = 16\ntrain.total = [1 2]\n", "bad.gin:2", ""),
])
def test_malformed_gin_gets_one_line_naming_file_and_line(tmp_path, capsys, text, where, what):
    assert launch.main([write(tmp_path / "bad.gin", text), "--workdir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and where in err and what in err
    assert not (tmp_path / "run").exists()


def test_bad_command_line_binding_is_named(tmp_path, capsys):
    gin_file = write(tmp_path / "t.gin", TEACHER)
    assert launch.main([gin_file, "--gin", "TRACT.nope = 1", "--workdir", str(tmp_path / "run")]) == 2
    assert "--gin 'TRACT.nope = 1'" in capsys.readouterr().err


def test_missing_teacher_says_which_run_to_do_first(tmp_path, capsys):
    gin_file = write(tmp_path / "s.gin", tract(tmp_path / "runs" / "digits_teacher"))
    assert launch.main([gin_file, "--workdir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "not found" in err and "gin/digits_teacher.gin" in err


def test_invalid_schedule_is_one_line(teacher_run, tmp_path, capsys):
    gin_file = write(tmp_path / "s.gin", tract(teacher_run, schedule=(64, 48, 1)))
    assert launch.main([gin_file, "--workdir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "48 does not divide T = 64" in err


def test_mismatched_teacher_network_is_one_line(teacher_run, tmp_path, capsys):
    gin_file = write(tmp_path / "s.gin", tract(teacher_run, extra="UNet.channels = 12"))
    assert launch.main([gin_file, "--workdir", str(tmp_path / "run")]) == 2
    assert "does not fit this run's network" in capsys.readouterr().err


def test_phase_boundary_refreshes_the_teacher_from_the_inference_ema(teacher_run, tmp_path):
    extra = "train.checkpoint_every = 16\ntrain.keep_checkpoints = 100"
    gin_file = write(tmp_path / "s.gin", tract(teacher_run, total=128, extra=extra))
    assert launch.main([gin_file, "--workdir", str(tmp_path / "run")]) == 0
    before = ckpt.load(ckpt.checkpoint_path(tmp_path / "run" / "checkpoints", 64))  # end of phase 0
    after = ckpt.load(ckpt.checkpoint_path(tmp_path / "run" / "checkpoints", 80))  # first step of phase 1
    start = ckpt.load(ckpt.checkpoint_path(tmp_path / "run" / "checkpoints", 16))
    teacher = torch.load(teacher_run / "ema.pt", weights_only=True)
    assert (before["phase"], after["phase"]) == (0, 1)
    assert all(torch.equal(before["teacher"][k], teacher[k]) for k in teacher)  # phase 0: the original teacher
    assert all(torch.equal(after["teacher"][k], before["inference_ema"]["module"][k]) for k in teacher)
    assert not all(torch.equal(after["teacher"][k], teacher[k]) for k in teacher)
    # the student, the self-teacher and the optimiser carry on; μ_I restarts nothing by default
    assert after["inference_ema"]["steps"] == before["inference_ema"]["steps"] + 1
    assert after["self_teacher"]["steps"] == before["self_teacher"]["steps"] + 1
    assert start["inference_ema"]["momentum"] == pytest.approx(1e-3 ** (1 / 4))


def test_local_executor_gives_the_same_weights_as_inline(teacher_run, tmp_path):
    gin_file = write(tmp_path / "s.gin", tract(teacher_run, total=64))
    assert launch.main([gin_file, "--workdir", str(tmp_path / "inline")]) == 0
    cmd = [sys.executable, "-m", "tract_repro.launch", gin_file, "--workdir", str(tmp_path / "local"), "--executor", "local"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=Path(__file__).parents[1])
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "local" / "submitit").is_dir()
    a = torch.load(tmp_path / "inline" / "ema.pt", weights_only=True)
    b = torch.load(tmp_path / "local" / "ema.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_diverging_loss_is_reported_in_one_line(teacher_run, tmp_path, capsys, monkeypatch):
    from tract_repro.methods import tract as tract_module

    real = tract_module.invert_ddim
    monkeypatch.setattr(tract_module, "invert_ddim", lambda *a: real(*a) * float("nan"))
    gin_file = write(tmp_path / "s.gin", tract(teacher_run, total=64))
    assert launch.main([gin_file, "--workdir", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "non-finite at sample 0" in err


@pytest.mark.parametrize("total", [256, 200])  # 200: phases of 100 samples, not whole batches of 16
def test_phases_run_as_separate_runs_equal_one_continuous_run(teacher_run, tmp_path, total):
    """Phase 1 continued from a phase-0 run ends bit-identical to the two-phase run (DVC shares phases)."""
    whole = write(tmp_path / "whole.gin", tract(teacher_run, total=total))
    assert launch.main([whole, "--workdir", str(tmp_path / "whole")]) == 0
    assert launch.main([whole, "--gin", "train.only_phase = 0", "--workdir", str(tmp_path / "p0")]) == 0
    assert (tmp_path / "p0" / "samples" / "final_8steps.png").is_file()
    assert launch.main([whole, "--gin", "train.only_phase = 1", "--gin", f"train.previous = '{tmp_path / 'p0'}'",
                        "--workdir", str(tmp_path / "p1")]) == 0
    a = torch.load(tmp_path / "whole" / "ema.pt", weights_only=True)
    b = torch.load(tmp_path / "p1" / "ema.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "p1" / "run.json").read_text())["final_student_steps"] == 1


def test_one_phase_zero_serves_runs_that_differ_only_in_mu_I(teacher_run, tmp_path, capsys):
    """A phase-0 run tracking extra inference EMAs continues into each μ_I's phase 1 exactly as that μ_I's own run would."""
    whole = {label: write(tmp_path / f"{name}.gin", tract(teacher_run, total=256, extra=extra)) for name, label, extra in [
        ("r", "residual=0.001", ""), ("m", "momentum=0.9", "inference_ema_momentum.momentum = 0.9")]}
    shared = write(tmp_path / "shared.gin", tract(teacher_run, total=256, extra="inference_ema_momentum.residual = 0.01\n"
                   "train.extra_inference_emas = [{'residual': 0.001}, {'momentum': 0.9}]"))
    assert launch.main([shared, "--gin", "train.only_phase = 0", "--workdir", str(tmp_path / "p0")]) == 0
    info = json.loads((tmp_path / "p0" / "run.json").read_text())
    assert info["inference_ema"] == "residual=0.01" and info["extra_inference_emas"] == ["residual=0.001", "momentum=0.9"]
    for label, gin_file in whole.items():
        assert launch.main([gin_file, "--workdir", str(tmp_path / f"whole_{label}")]) == 0
        assert launch.main([gin_file, "--gin", "train.only_phase = 1", "--gin", f"train.previous = '{tmp_path / 'p0'}'",
                            "--workdir", str(tmp_path / f"p1_{label}")]) == 0
        a = torch.load(tmp_path / f"whole_{label}" / "ema.pt", weights_only=True)
        b = torch.load(tmp_path / f"p1_{label}" / "ema.pt", weights_only=True)
        assert all(torch.equal(a[k], b[k]) for k in a), label
    untracked = write(tmp_path / "u.gin", tract(teacher_run, total=256, extra="inference_ema_momentum.residual = 0.5"))
    assert launch.main([untracked, "--gin", "train.only_phase = 1", "--gin", f"train.previous = '{tmp_path / 'p0'}'",
                        "--workdir", str(tmp_path / "p1_u")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "holds no inference EMA with residual=0.5" in err and "train.extra_inference_emas" in err


def test_extra_inference_emas_are_checked(teacher_run, tmp_path, capsys):
    for i, (extra, message) in enumerate([("[{'residual': 0.001}]", "lists residual=0.001 twice"), ("[{'rate': 0.1}]", "has ['rate']")]):
        gin_file = write(tmp_path / f"x{i}.gin", tract(teacher_run, total=64, extra=f"train.extra_inference_emas = {extra}"))
        assert launch.main([gin_file, "--workdir", str(tmp_path / f"x{i}")]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and message in err


def test_continuing_a_different_run_is_refused(teacher_run, tmp_path, capsys):
    first = write(tmp_path / "a.gin", tract(teacher_run, total=256))
    assert launch.main([first, "--gin", "train.only_phase = 0", "--workdir", str(tmp_path / "p0")]) == 0
    other = write(tmp_path / "b.gin", tract(teacher_run, total=256, extra="train.seed = 5"))
    assert launch.main([other, "--gin", "train.only_phase = 1", "--gin", f"train.previous = '{tmp_path / 'p0'}'",
                        "--workdir", str(tmp_path / "p1")]) == 2
    assert "differs from this run in seed" in capsys.readouterr().err
    assert launch.main([first, "--gin", "train.only_phase = 1", "--workdir", str(tmp_path / "p1b")]) == 2
    assert "set train.previous" in capsys.readouterr().err


def test_a_failed_local_job_reports_its_exception_line(teacher_run, tmp_path, capsys):
    gin_file = write(tmp_path / "s.gin", tract(teacher_run, total=64))
    assert launch.main([gin_file, "--gin", "train.only_phase = 1", "--gin", "train.previous = '/nonexistent'",
                        "--seeds", "0", "--workdir", str(tmp_path / "s{seed}")]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "ConfigError: train.previous = /nonexistent is not a run directory" in err


def test_a_many_step_student_draws_no_final_grid(teacher_run, tmp_path):
    """Above train.grid_max_steps the final grid would cost more than a short phase: evaluation draws it instead."""
    run = write(tmp_path / "p0.gin", tract(teacher_run, schedule=(64, 16, 1), total=64))
    assert launch.main([run, "--gin", "train.only_phase = 0", "--workdir", str(tmp_path / "p0")]) == 0
    assert (tmp_path / "p0" / "ema.pt").is_file() and not list((tmp_path / "p0" / "samples").glob("final_*"))


def test_seeds_run_in_forked_processes_that_stop_with_the_launcher(teacher_run, tmp_path):
    """--seeds forks one process per seed (output in <run>/launch.log); killing the launcher stops them."""
    import os
    import signal
    import time

    gin_file = write(tmp_path / "s.gin", tract(teacher_run, total=1 << 20))  # far longer than the test waits
    cmd = [sys.executable, "-m", "tract_repro.launch", gin_file, "--seeds", "0", "1", "--parallel", "2",
           "--workdir", str(tmp_path / "s{seed}")]
    launcher = subprocess.Popen(cmd, cwd=Path(__file__).parents[1], start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not all((tmp_path / f"s{s}" / "run.json").is_file() for s in (0, 1)):
        time.sleep(0.5)
    assert all((tmp_path / f"s{s}" / "launch.log").is_file() for s in (0, 1)), "the seeds did not start"
    launcher.send_signal(signal.SIGTERM)
    assert launcher.wait(timeout=60) != 0
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            os.killpg(launcher.pid, 0)  # anything left in the launcher's process group?
        except ProcessLookupError:
            break
        time.sleep(0.5)
    else:
        os.killpg(launcher.pid, signal.SIGKILL)
        raise AssertionError("forked runs outlived their launcher")


EXIT_PROGRAM = """
import atexit, sys
from tract_repro.launching.process import exit_now
atexit.register(lambda: open(sys.argv[1], "w").write("atexit ran"))
print("buffered line", end="")          # stdout is a pipe: block-buffered until flushed
print("and stderr", end="", file=sys.stderr)
exit_now(int(sys.argv[2]) if sys.argv[2] != "None" else None)
"""


@pytest.mark.parametrize("code, status", [(3, 3), (0, 0), ("None", 0)])
def test_exit_now_flushes_output_and_runs_atexit_before_it_exits(tmp_path, code, status):
    """The entry points end with exit_now (no interpreter teardown): nothing printed or registered is lost."""
    marker = tmp_path / "marker"
    done = subprocess.run([sys.executable, "-c", EXIT_PROGRAM, str(marker), str(code)], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1])
    assert (done.returncode, done.stdout, done.stderr) == (status, "buffered line", "and stderr")
    assert marker.read_text() == "atexit ran"


def test_paced_forked_seeds_train_the_same_weights_as_one_run_alone(teacher_run, tmp_path):
    """--seeds forks the runs with pacing (a seed ahead of its siblings waits): only when steps happen changes."""
    gin_file = write(tmp_path / "s.gin", tract(teacher_run, total=512))
    cmd = [sys.executable, "-m", "tract_repro.launch", gin_file, "--seeds", "0", "1", "2", "--parallel", "3",
           "--workdir", str(tmp_path / "s{seed}")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=Path(__file__).parents[1])
    assert done.returncode == 0, done.stderr[-2000:]
    assert launch.main([gin_file, "--gin", "train.seed = 2", "--workdir", str(tmp_path / "alone")]) == 0
    a = torch.load(tmp_path / "s2" / "ema.pt", weights_only=True)
    b = torch.load(tmp_path / "alone" / "ema.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_run_ahead_waits_for_the_slowest_running_sibling_only():
    import threading
    import time

    from tract_repro.launching.pacing import Pace

    progress = [0, 0, -1]  # the third sibling is not running: never waited for
    ahead, slow = Pace(progress, 0, slack=1, nap=0.001), Pace(progress, 1, slack=1)
    ahead(1)  # one step ahead: within the slack
    released = []
    waiter = threading.Thread(target=lambda: (ahead(3), released.append(time.perf_counter())))
    waiter.start()
    time.sleep(0.05)
    assert not released  # 3 steps against 0: it waits
    moved = time.perf_counter()
    slow(2)  # the slow one catches up to within one step
    waiter.join(timeout=5)
    assert released and released[0] >= moved and progress[:2] == [3, 2]
    slow.leave()
    ahead(10)  # a sibling that left is never waited for
    assert progress == [10, -1, -1]
