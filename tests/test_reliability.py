"""Nothing lost, nothing silently wrong: verified checkpoints, a locked run directory, Ctrl-C and
SIGTERM that checkpoint, launchers whose seeds die with them, and imports that touch no existing run."""
import fcntl
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import bitwise_equal, tiny_gin
from tract_repro import import_teacher, launch
from tract_repro.common.errors import ConfigError
from tract_repro.training import checkpoint as ckpt

ROOT = Path(__file__).resolve().parents[1]
TEACHER = tiny_gin("train.method = @TeacherTraining()\nTeacherTraining.sample_steps = 8\n"
                   "inference_ema_momentum.momentum = 0.9", total=512) + "train.checkpoint_every = 128\n"


def write(path, text):
    path.write_text(text)
    return str(path)


def gated(gate, after):
    """Data that wait at ``gate`` after ``after`` batches (tests/gated_data.py), or until a stop is asked for."""
    return f"import tests.gated_data\ntrain.dataset = @gated_digits\ngated_digits.gate = '{gate}'\ngated_digits.after = {after}\n"


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished tiny run (checkpoints at 384 and 512, ema.pt) that the tests copy."""
    root = tmp_path_factory.mktemp("finished")
    assert launch.main([write(root / "run.gin", TEACHER), "--workdir", str(root / "run")]) == 0
    return root


def copy_run(finished, tmp_path):
    shutil.copytree(finished / "run", tmp_path / "run")
    shutil.copy(finished / "run.gin", tmp_path / "run.gin")
    return str(tmp_path / "run.gin"), tmp_path / "run"


def flip(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def files_of(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------------------------- checksums

def test_every_flipped_byte_of_a_checkpoint_is_detected(finished, tmp_path):
    source = ckpt.list_checkpoints(finished / "run" / "checkpoints")[-1]
    size = source.stat().st_size
    rng = random.Random(0)
    offsets = [0, size - 1] + rng.sample(range(1, size - 1), 22)
    for offset in offsets:  # every region of the file: zip headers, the pickle, tensor data, padding, the directory
        copy = tmp_path / source.name
        shutil.copy(source, copy)
        shutil.copy(ckpt.checksum_path(source), ckpt.checksum_path(copy))
        flip(copy, offset)
        with pytest.raises(ckpt.UnreadableCheckpoint, match="does not match its sha256"):
            ckpt.load(copy)
    assert bitwise_equal(ckpt.load(source), torch.load(source, weights_only=True))


def test_a_truncated_checkpoint_is_refused_in_one_line(finished, tmp_path):
    source = ckpt.list_checkpoints(finished / "run" / "checkpoints")[-1]
    cut = tmp_path / "cut.pt"
    cut.write_bytes(source.read_bytes()[: source.stat().st_size // 2])
    with pytest.raises(ckpt.UnreadableCheckpoint, match="cannot be read as a checkpoint") as caught:
        ckpt.load(cut)  # no checksum beside it: read, and refused as unreadable
    assert "\n" not in str(caught.value) and str(cut) in str(caught.value)
    shutil.copy(ckpt.checksum_path(source), ckpt.checksum_path(cut))
    with pytest.raises(ckpt.UnreadableCheckpoint, match="does not match its sha256"):
        ckpt.load(cut)


def test_a_corrupt_newest_checkpoint_is_set_aside_and_the_run_ends_the_same(finished, tmp_path, capsys):
    """The newest checkpoint of an interrupted run is corrupt: it is renamed, not deleted; the run resumes
    from the one before, says so in one line, and ends with the weights of the uninterrupted run."""
    gin_file, run = copy_run(finished, tmp_path)
    (run / "ema.pt").unlink()  # as if interrupted after its last checkpoint
    newest, before = ckpt.list_checkpoints(run / "checkpoints")[-1], ckpt.list_checkpoints(run / "checkpoints")[-2]
    flip(newest, newest.stat().st_size // 2)
    assert launch.main([gin_file, "--workdir", str(run)]) == 0
    out = capsys.readouterr().out
    warnings = [line for line in out.splitlines() if line.startswith("warning:")]
    assert warnings == [f"warning: {newest} does not match its sha256 ({newest.name}.sha256): the file is corrupt; "
                        f"set aside as {newest.name}.corrupt; resuming from {before}"]
    assert (run / "checkpoints" / f"{newest.name}.corrupt").is_file()
    assert bitwise_equal(torch.load(run / "ema.pt", weights_only=True),
                         torch.load(finished / "run" / "ema.pt", weights_only=True))
    assert bitwise_equal(ckpt.load(newest), ckpt.load(finished / "run" / "checkpoints" / newest.name))


def test_no_usable_checkpoint_is_one_line_and_nothing_is_deleted(finished, tmp_path, capsys):
    gin_file, run = copy_run(finished, tmp_path)
    (run / "ema.pt").unlink()
    for path in ckpt.list_checkpoints(run / "checkpoints"):
        path.write_bytes(path.read_bytes()[:100])
    sizes = sorted(p.stat().st_size for p in (run / "checkpoints").iterdir())
    assert launch.main([gin_file, "--workdir", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: no usable checkpoint in {run / 'checkpoints'}")
    assert "ckpt_000000000512.pt.corrupt" in err and "ckpt_000000000384.pt.corrupt" in err
    assert sorted(p.stat().st_size for p in (run / "checkpoints").iterdir()) == sizes  # renamed, not deleted


def test_a_pickle_that_would_run_code_is_refused_not_loaded(finished, tmp_path, capsys):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil = tmp_path / "teacher.pt"
    torch.save({"net.x": Payload()}, evil)
    text = tiny_gin(f"train.method = @TRACT()\nTRACT.schedule = (64, 8, 1)\ntrain.teacher = '{evil}'\n"
                    "inference_ema_momentum.residual = 1e-3", total=64)
    assert launch.main([write(tmp_path / "d.gin", text), "--workdir", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {evil} is not a plain checkpoint (loading it would run code): refused, not loaded\n"
    assert not marker.exists() and not (tmp_path / "d").exists()


# ------------------------------------------------------------------------------------ locks and signals

def test_a_second_trainer_is_refused_with_the_holders_pid(finished, tmp_path, capsys):
    gin_file, run = copy_run(finished, tmp_path)
    (run / "ema.pt").unlink()
    before = files_of(run)
    with open(run / ".lock", "a+") as held:  # another trainer holds the run
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.truncate(0)
        held.write("4242\n")
        held.flush()
        assert launch.main([gin_file, "--workdir", str(run)]) == 2
    assert capsys.readouterr().err == (f"error: {run} is in use by another trainer (pid 4242): let it finish, or stop it "
                                       f"(kill 4242) and run this command again\n")
    before.pop(".lock")
    assert {k: v for k, v in files_of(run).items() if k != ".lock"} == before


def test_a_requeued_slurm_job_waits_for_its_previous_instance_to_release_the_lock(tmp_path, monkeypatch):
    """SLURM may start a requeued job while its previous instance is still exiting with the folder's lock."""
    from tract_repro.training import run_files

    run = tmp_path / "run"
    run.mkdir()
    waiting, outcome = threading.Event(), {}
    monkeypatch.setattr(run_files, "waiting_for", lambda path, holder: waiting.set())
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")

    def trainer():
        try:
            with run_files.RunDirectory(run).locked():
                outcome["pid"] = (run / ".lock").read_text()
        except BaseException as exc:  # noqa: BLE001
            outcome["error"] = exc

    held = open(run / ".lock", "a+")  # the previous instance
    fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
    held.write("4242\n")
    held.flush()
    thread = threading.Thread(target=trainer)
    thread.start()
    assert waiting.wait(60), "the requeued trainer did not wait for the lock"
    held.close()  # the previous instance exits
    thread.join(60)
    assert outcome == {"pid": f"{os.getpid()}\n"}

    monkeypatch.setattr(run_files, "REQUEUE_LOCK_WAIT_S", 0.2)  # a holder that never exits: refused as before
    with open(run / ".lock", "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(ConfigError, match="is in use by another trainer"):
            with run_files.RunDirectory(run).locked():
                pass


@pytest.mark.parametrize("number", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_and_sigterm_checkpoint_at_a_step_boundary_and_say_how_to_resume(finished, tmp_path, number):
    gate = tmp_path / "gate"
    text = TEACHER.replace("train.checkpoint_every = 128", "train.checkpoint_every = 4096") + gated(gate, 10)
    gin_file, run = write(tmp_path / "run.gin", text), tmp_path / "run"
    cmd = [sys.executable, "-m", "tract_repro.launch", gin_file, "--workdir", str(run)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_until(lambda: (run / "metrics.jsonl").is_file() or proc.poll() is not None, "the first log line")  # step 4
    proc.send_signal(number)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + number, err[-2000:]
    found = ckpt.list_checkpoints(run / "checkpoints")
    samples = int(found[-1].stem.split("_")[1])
    assert len(found) == 1 and 4 * 16 <= samples <= 11 * 16
    assert err.strip().splitlines()[-1] == (f"error: stopped at sample {samples} with a checkpoint ({found[-1]}): "
                                            f"run the same command again to resume")
    gate.touch()
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert bitwise_equal(torch.load(run / "ema.pt", weights_only=True),
                         torch.load(finished / "run" / "ema.pt", weights_only=True))


def wait_until(condition, what, timeout=300):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


def alive(pid):
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (FileNotFoundError, ProcessLookupError):
        return False


def test_a_killed_seeds_launcher_takes_its_runs_down_and_a_new_one_resumes_them(finished, tmp_path):
    """SIGKILL of a `--seeds 0 1 --parallel 2` launcher: both forked runs checkpoint and stop (none trains on
    alone); the same command then finishes both, each with one record per logging interval."""
    gate = tmp_path / "gate"
    text = TEACHER.replace("train.checkpoint_every = 128", "train.checkpoint_every = 4096") + gated(gate, 6)
    gin_file = write(tmp_path / "run.gin", text)
    cmd = [sys.executable, "-m", "tract_repro.launch", gin_file, "--seeds", "0", "1", "--parallel", "2",
           "--workdir", str(tmp_path / "s{seed}")]
    launcher = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    runs = [tmp_path / "s0", tmp_path / "s1"]
    wait_until(lambda: all((r / "metrics.jsonl").is_file() for r in runs), "both runs to train")  # both at the gate
    pids = [int((r / ".lock").read_text()) for r in runs]
    assert all(alive(pid) for pid in pids) and launcher.pid not in pids
    launcher.kill()
    launcher.wait()
    wait_until(lambda: not any(alive(pid) for pid in pids), "the forked runs to stop")
    for run in runs:
        assert ckpt.list_checkpoints(run / "checkpoints"), "a forked run stopped without a checkpoint"
        assert (run / "launch.log").read_text().strip().splitlines()[-1].startswith("Stopped: stopped at sample")
        assert not (run / "ema.pt").exists()
    gate.touch()
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    for run in runs:
        samples = [json.loads(line)["samples"] for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert samples == sorted(set(samples)) and samples[-1] == 512


# ---------------------------------------------------------------------------- nothing written on failure

def test_a_configuration_that_fails_leaves_no_file(finished, tmp_path, capsys):
    bad = TEACHER.replace("train.total = 512", "train.total = 8")  # shorter than one batch
    assert launch.main([write(tmp_path / "bad.gin", bad), "--workdir", str(tmp_path / "new")]) == 2
    assert "at least one batch" in capsys.readouterr().err and not (tmp_path / "new").exists()
    assert launch.main([write(tmp_path / "good.gin", TEACHER), "--workdir", str(tmp_path / "new")]) == 0  # not refused


def imported(tmp_path, weights):
    text = tiny_gin("train.method = @TeacherTraining()", total=64) + f"import_teacher.weights = '{weights}'\n"
    return write(tmp_path / "import.gin", text)


def test_an_import_never_touches_an_existing_run(finished, tmp_path, capsys):
    _, run = copy_run(finished, tmp_path)
    before = files_of(run)
    gin_file = imported(tmp_path, finished / "run" / "ema.pt")
    assert import_teacher.main([gin_file, "--workdir", str(run)]) == 2
    assert capsys.readouterr().err == f"error: {run} already holds files (a run or another import): import into a new --workdir\n"
    assert files_of(run) == before
    assert import_teacher.main([gin_file, "--workdir", str(tmp_path / "new")]) == 0
    assert {p.name for p in (tmp_path / "new").iterdir()} == {"config.gin", "ema.pt", "ema.pt.sha256", "run.json"}
    assert import_teacher.main([gin_file, "--workdir", str(tmp_path / "new")]) == 0  # the same import: nothing to do
    assert "already holds this import" in capsys.readouterr().out


def test_a_failed_import_leaves_nothing(tmp_path, capsys):
    text_file = tmp_path / "weights.pt"
    text_file.write_text("not a checkpoint\n")
    assert import_teacher.main([imported(tmp_path, text_file), "--workdir", str(tmp_path / "new")]) == 2
    assert "cannot be read as a checkpoint" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["import.gin", "weights.pt"]
