"""``--executor slurm`` against a real single-node SLURM, which this module starts with .ci/slurm-up.

The cluster needs root (apt install of slurm-wlm and munge, then munged, slurmctld and
slurmd). Without root the tests that need it are skipped, and the daemons are stopped, by pid,
at the end of the session.
"""
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import bitwise_equal, tiny_gin
from tests.slurm_probe import record_distributed_env  # light enough to import in every task of a job
from tract_repro import launch
from tract_repro.launching.slurm import LOGS
from tract_repro.training import checkpoint as ckpt

ROOT = Path(__file__).resolve().parents[1]
BASE = Path(os.environ.get("TRACT_SLURM_BASE", "/tmp/tract-slurm"))
TOTAL = 1920  # long enough that a run is still going when it is interrupted
RUN = tiny_gin("train.method = @TeacherTraining()\nTeacherTraining.sample_steps = 8\n"
               "inference_ema_momentum.momentum = 0.9\nUNet.dropout = 0.1", total=TOTAL)
SLURM = "slurm.partition = 'debug'\nslurm.time_min = 10\nslurm.mem_gb = 1\nslurm.signal_delay_s = 60\n"


def _alive(pid_file):
    try:
        os.kill(int(pid_file.read_text()), 0)
        return True
    except (OSError, ValueError):
        return False


@pytest.fixture(scope="session")
def slurm_cluster():
    """SLURM_CONF of a running single-node cluster (started here, stopped at the end of the session)."""
    if os.geteuid() != 0 and shutil.which("sbatch") is None:
        pytest.skip("needs root to install and start a single-node SLURM (.ci/slurm-up)")
    conf = BASE / "etc" / "slurm.conf"
    ours = not _alive(BASE / "run" / "slurmctld.pid")  # reuse a cluster that .ci/slurm-up already started here
    if ours:
        up = subprocess.run([str(ROOT / ".ci" / "slurm-up"), str(BASE)], capture_output=True, text=True, timeout=600)
        if up.returncode != 0:
            installed = subprocess.run(["dpkg", "-s", "slurmctld"], capture_output=True).returncode == 0
            if up.returncode == 2 or not installed:
                pytest.skip(f"could not install or start SLURM: {(up.stderr.strip().splitlines() or ['?'])[-1]}")
            pytest.fail(f".ci/slurm-up failed: {up.stdout[-1000:]}{up.stderr[-2000:]}")
    before = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(conf)
    yield conf
    if ours:
        left = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout.split()
        if left:  # jobs of a failed test: don't leave them training
            subprocess.run(["scancel", *left], capture_output=True)
            for _ in range(30):
                if not subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout.split():
                    break
                time.sleep(0.5)
        subprocess.run([str(ROOT / ".ci" / "slurm-down"), str(BASE)], capture_output=True, timeout=120)
    if before is None:
        os.environ.pop("SLURM_CONF", None)
    else:
        os.environ["SLURM_CONF"] = before


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted inline run that every SLURM run of RUN must match bit for bit."""
    root = tmp_path_factory.mktemp("reference")
    (root / "run.gin").write_text(RUN)
    assert launch.main([str(root / "run.gin"), "--workdir", str(root / "run")]) == 0
    return root / "run"


def write(path, text):
    path.write_text(text)
    return str(path)


def submit(args):
    """Start the launcher as a user would; returns (process, job id) once it has submitted."""
    cmd = [sys.executable, "-m", "tract_repro.launch", *args, "--executor", "slurm", "--wait"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if not line.startswith("submitted SLURM job"):
        proc.kill()
        pytest.fail(f"not submitted: {line}{proc.communicate()[1][-2000:]}")
    return proc, line.split()[3].rstrip(";")


def finish(proc, workdir=None):
    """The launcher's stdout once it has exited 0; else fail with its stderr and the tails of the jobs' logs."""
    out, err = proc.communicate(timeout=300)
    if proc.returncode != 0:
        logs = sorted(Path(workdir).glob(f"{LOGS}/*/*_log.*")) if workdir is not None else []
        pytest.fail(err[-3000:] + "".join(f"\n--- {p.name}:\n{p.read_text()[-2000:]}" for p in logs))
    return out


def state(job_id):
    out = subprocess.run(["squeue", "-h", "-t", "all", "-j", job_id, "-o", "%T"], capture_output=True, text=True)
    return out.stdout.strip()


def wait_for(condition, what, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    pytest.fail(f"timed out waiting for {what}")


def release_when_requeued(job_id):
    """SLURM holds a requeued batch job for two minutes (BeginTime); let it start now."""
    wait_for(lambda: state(job_id) == "PENDING", "the job to be requeued")
    subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], check=True)


def samples_of(path):
    return int(path.stem.split("_")[1])


def job_log(workdir, job_id):
    return (workdir / "slurm" / job_id / f"{job_id}_0_log.out").read_text()


def assert_same_as(reference, workdir):
    a = ckpt.load(ckpt.list_checkpoints(reference / "checkpoints")[-1])
    b = ckpt.load(ckpt.list_checkpoints(workdir / "checkpoints")[-1])
    assert a["samples"] == b["samples"] == TOTAL
    for key in a:
        assert bitwise_equal(a[key], b[key]), f"{key} differs from the uninterrupted run"
    ema_a = torch.load(reference / "ema.pt", weights_only=True)
    ema_b = torch.load(workdir / "ema.pt", weights_only=True)
    assert ema_a.keys() == ema_b.keys() and all(torch.equal(ema_a[k], ema_b[k]) for k in ema_a)


def test_without_sbatch_slurm_is_one_line_exit_2(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch, no srun
    gin_file = write(tmp_path / "run.gin", RUN)
    assert launch.main([gin_file, "--executor", "slurm", "--workdir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("error:") and "sbatch" in err and ".ci/slurm-up" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("binding,message", [
    ("slurm.bogus = 1", "doesn't have a parameter named 'bogus'"),
    ("slurm.tasks_per_node = 0", "slurm.tasks_per_node = 0"),
    ("slurm.signal_delay_s = 600", "slurm.signal_delay_s = 600"),  # not before a 10-minute limit
    ("slurm.partition = 'nope'", "SLURM refused the job: sbatch: error: invalid partition specified: nope"),
])
def test_config_errors_exit_2_in_one_line_and_submit_nothing(slurm_cluster, tmp_path, capsys, binding, message):
    gin_file = write(tmp_path / "run.gin", RUN + SLURM)
    jobs = subprocess.run(["squeue", "-h", "-t", "all", "-o", "%i"], capture_output=True, text=True).stdout.split()
    assert launch.main([gin_file, "--gin", binding, "--executor", "slurm", "--workdir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("error:") and message in err
    assert not (tmp_path / "run").exists()
    assert subprocess.run(["squeue", "-h", "-t", "all", "-o", "%i"], capture_output=True, text=True).stdout.split() == jobs


def test_gin_options_reach_the_sbatch_script_and_wait_reports_a_failed_job(slurm_cluster, tmp_path):
    """--seeds 0 3: two held jobs with the gin-bound options; seed 3's asks for a phase that doesn't exist.

    A second launch with --wait doesn't submit them again: it waits for the queued jobs.
    """
    options = SLURM + ("slurm.cpus_per_task = 1\nslurm.account = 'tract-ci'\nslurm.job_name = 'tiny'\n"
                       "slurm.extra_sbatch = {'comment': 'made-by-test', 'hold': True}\n"
                       "slurm.setup = ['export TRACT_SETUP=1']\n")
    gin_file = write(tmp_path / "run.gin", RUN.replace(f"train.total = {TOTAL}", "train.total = 32") + options)
    cmd = [sys.executable, "-m", "tract_repro.launch", gin_file, "--seeds", "0", "3", "--gin", "train.only_phase = {seed}",
           "--workdir", str(tmp_path / "s{seed}"), "--executor", "slurm"]
    submitted = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert submitted.returncode == 0, submitted.stderr[-3000:]
    runs = {seed: tmp_path / f"s{seed}" for seed in (0, 3)}
    ids = {seed: (run / "slurm" / "latest_job").read_text().split()[0] for seed, run in runs.items()}
    for seed, run in runs.items():
        assert f"submitted SLURM job {ids[seed]}; logs in {run / 'slurm' / ids[seed]}" in submitted.stdout
        assert state(ids[seed]) == "PENDING"  # held
        script = (run / "slurm" / ids[seed] / f"{ids[seed]}_submission.sh").read_text()
        for line in ["--partition=debug", "--time=10", "--mem=1GB", "--cpus-per-task=1", "--account=tract-ci",
                     "--job-name=tiny", "--comment=made-by-test", "--hold", "--signal=USR2@60", "--nodes=1",
                     "--ntasks-per-node=1", f"--output={run / 'slurm'}/%j/%j_0_log.out"]:
            assert f"#SBATCH {line}\n" in script
        assert "export TRACT_SETUP=1" in script and "gpus" not in script

    waiting = subprocess.Popen(cmd + ["--wait"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for seed in (0, 3):
        line = waiting.stdout.readline()
        assert line == f"{runs[seed]} is already queued or running as SLURM job {ids[seed]}: not submitted again\n"
    subprocess.run(["scontrol", "release", *ids.values()], check=True)
    out, err = waiting.communicate(timeout=300)
    err = err.strip()
    assert waiting.returncode == 1 and "\n" not in err, err[-3000:]
    assert err.startswith("error: 1 of 2 jobs failed") and "ConfigError: train.only_phase = 3, but the schedule has phases 0..0" in err
    assert (runs[0] / "ema.pt").is_file() and not (runs[3] / "ema.pt").exists()
    assert f"done: {runs[0]}" in out


def test_forced_requeue_resumes_bit_identical(slurm_cluster, reference, tmp_path):
    """`scontrol requeue` (no signal first, as a preemption): the requeued job resumes from the newest checkpoint.

    The job's data wait at a gate after its 12th batch (tests/gated_data.py), so the requeue reaches
    a run that is still training however fast the machine is; the gate opens for the requeued job.
    """
    gate = tmp_path / "gate"
    gated = (f"import tests.gated_data\ntrain.dataset = @gated_digits\ngated_digits.gate = '{gate}'\n"
             "gated_digits.after = 12\n")
    gin_file = write(tmp_path / "run.gin", RUN + SLURM + "train.checkpoint_every = 160\n" + gated)
    workdir = tmp_path / "run"
    proc, job_id = submit([gin_file, "--workdir", str(workdir)])
    found = wait_for(lambda: ckpt.list_checkpoints(workdir / "checkpoints"), "a checkpoint")
    assert [samples_of(p) for p in found] == [160]  # 10 steps of 16; the 13th step waits at the gate
    subprocess.run(["scontrol", "requeue", job_id], check=True)  # as a preemption without warning would
    wait_for(lambda: state(job_id) == "PENDING", "the job to be requeued")
    assert not (workdir / "ema.pt").exists()
    gate.touch()
    release_when_requeued(job_id)
    finish(proc, workdir)
    log = job_log(workdir, job_id)
    resumed = [line for line in log.splitlines() if line.startswith(f"training {workdir}: resuming from ckpt_")]
    assert len(resumed) == 1 and samples_of(Path(resumed[0].split()[-1])) >= samples_of(found[-1])
    assert samples_of(Path(resumed[0].split()[-1])) < TOTAL
    assert_same_as(reference, workdir)


def test_time_limit_signal_checkpoints_at_a_step_boundary_and_requeues(slurm_cluster, reference, tmp_path):
    """USR2, which SLURM sends signal_delay_s before the time limit, to the job's tasks (not --batch)."""
    gin_file = write(tmp_path / "run.gin", RUN + SLURM + f"train.checkpoint_every = {TOTAL}\ntrain.keep_checkpoints = 100\n")
    workdir = tmp_path / "run"
    proc, job_id = submit([gin_file, "--workdir", str(workdir)])
    wait_for(lambda: (workdir / "metrics.jsonl").is_file() and (workdir / "metrics.jsonl").read_text(), "training")
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True)
    written = wait_for(lambda: ckpt.list_checkpoints(workdir / "checkpoints"), "the checkpoint at the signal", timeout=60)
    at_signal = samples_of(written[0])  # the only periodic checkpoint is the final one
    assert 0 < at_signal < TOTAL and not (workdir / "ema.pt").exists()
    release_when_requeued(job_id)
    finish(proc, workdir)
    log = job_log(workdir, job_id)
    assert f"stop requested: checkpoint at sample {at_signal} written to" in log
    assert f"training {workdir}: resuming from {written[0].name}" in log
    assert [samples_of(p) for p in ckpt.list_checkpoints(workdir / "checkpoints")] == [at_signal, TOTAL]
    assert_same_as(reference, workdir)


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="two tasks need two CPUs")
def test_a_multi_task_job_exports_the_torch_distributed_environment(slurm_cluster, tmp_path):
    from tract_repro.launching import slurm

    options = slurm.SlurmOptions(partition="debug", tasks_per_node=2, time_min=5, mem_gb=1, signal_delay_s=60,
                          extra_sbatch={"chdir": str(ROOT)})
    job = slurm.submit_run(slurm.SlurmRun(record_distributed_env, str(tmp_path)), tmp_path / "slurm", options)
    slurm.wait(job)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for rank, values in enumerate(ranks):
        assert values["RANK"] == values["LOCAL_RANK"] == str(rank)
        assert values["WORLD_SIZE"] == values["LOCAL_WORLD_SIZE"] == "2"
    assert ranks[0]["MASTER_ADDR"] == ranks[1]["MASTER_ADDR"] and ranks[0]["MASTER_ADDR"]
    assert ranks[0]["MASTER_PORT"] == ranks[1]["MASTER_PORT"] and int(ranks[0]["MASTER_PORT"]) > 0
