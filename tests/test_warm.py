"""Warm-started stage processes (tract_repro.warm): a served entry point behaves as `python -m` would."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from tests.conftest import tiny_gin

ROOT = Path(__file__).resolve().parents[1]

PROBE = '''
from tract_repro.launching import warm

warm.forward(__name__, __spec__)

import json, os, signal, sys, time
mode = sys.argv[1]
if mode == "report":
    print(json.dumps({"served": warm.served(), "argv": sys.argv[1:], "cwd": os.getcwd(), "name": __name__,
                      "foo": os.environ.get("FOO"), "stdin": sys.stdin.read(), "pgid_is_own": os.getpgid(0) == os.getpid(),
                      "inductor_cache": "TORCHINDUCTOR_CACHE_DIR" in os.environ, "socket": os.environ.get("TRACT_WARM")}))
    print("to stderr", file=sys.stderr)
    sys.exit(3)
if mode == "raise":
    raise RuntimeError("probe failed")
if mode == "sleep":  # wait for SIGTERM; say so in a file
    signal.signal(signal.SIGTERM, lambda *a: (open(sys.argv[2] + ".term", "w").write("term"), os._exit(5)))
    open(sys.argv[2] + ".ready", "w").write(str(os.getpid()))
    time.sleep(120)
    sys.exit(9)
'''


def wrapped(script, tmp_path, env=None, cwd=ROOT):
    """Run a bash script under `python -m tract_repro.warm` with the probe module importable."""
    (tmp_path / "warm_probe.py").write_text(PROBE)
    env = dict(os.environ, PYTHONPATH=str(tmp_path), PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}", **(env or {}))
    return subprocess.run([sys.executable, "-m", "tract_repro.warm", "--", "bash", "-c", script], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_a_served_module_gets_the_clients_argv_env_streams_and_exit_status(tmp_path):
    out = tmp_path / "out"
    script = (f"echo piped | FOO=bar python -m warm_probe report x y > {out}.1 2> {out}.2; echo $? > {out}.3; "
              f"python -m warm_probe raise 2> {out}.4; echo $? > {out}.5; exit 7")
    done = wrapped(script, tmp_path)
    assert done.returncode == 7, done.stderr  # the command's status is the wrapper's
    report = json.loads((tmp_path / "out.1").read_text())
    assert not Path(report.pop("socket")).parent.exists()  # the server cleaned up after itself
    assert report == {"served": True, "argv": ["report", "x", "y"], "cwd": str(ROOT), "name": "__main__", "foo": "bar",
                      "stdin": "piped\n", "pgid_is_own": True, "inductor_cache": True}
    assert (tmp_path / "out.2").read_text() == "to stderr\n"
    assert (tmp_path / "out.3").read_text() == "3\n"
    assert "RuntimeError: probe failed" in (tmp_path / "out.4").read_text()
    assert (tmp_path / "out.5").read_text() == "1\n"


def test_a_client_unlike_the_server_runs_cold_and_says_why(tmp_path):
    """Load-time environment, edited sources or no server: the client runs the module itself."""
    copy = tmp_path / "repo"
    shutil.copytree(ROOT / "tract_repro", copy / "tract_repro", ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path / "out"
    script = (f"OMP_NUM_THREADS=7 python -m warm_probe report < /dev/null > {out}.env 2> {out}.env.err; "
              f"touch -d '2001-01-01' tract_repro/diffusion/ddim.py; "
              f"python -m warm_probe report < /dev/null > {out}.src 2> {out}.src.err; "
              f"TRACT_WARM={tmp_path}/none python -m warm_probe report < /dev/null > {out}.none 2> {out}.none.err")
    done = wrapped(script, tmp_path, cwd=copy)
    assert done.returncode == 3, done.stderr
    for case, why in (("env", "env differs"), ("src", "sources differs"), ("none", None)):
        assert json.loads((tmp_path / f"out.{case}").read_text())["served"] is False
        err = (tmp_path / f"out.{case}.err").read_text()
        assert err == (f"warm start skipped ({why} from the server's); running cold\n" if why else "") + "to stderr\n"


def test_signals_reach_the_child_and_a_killed_client_takes_its_child_with_it(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    wait = "for i in $(seq 600); do [ -f {0}.ready ] && break; sleep 0.1; done"
    script = (f"python -m warm_probe sleep {a} & c=$!; {wait.format(a)}; kill -TERM $c; wait $c; echo $? > {a}.status; "
              f"python -m warm_probe sleep {b} & c=$!; {wait.format(b)}; kill -KILL $c; wait $c; "
              f"for i in $(seq 100); do [ -f {b}.term ] && break; sleep 0.1; done")
    done = wrapped(script, tmp_path)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "a.term").read_text() == "term"  # forwarded by the client
    assert (tmp_path / "a.status").read_text() == "5\n"
    assert (tmp_path / "b.term").read_text() == "term"  # sent by the server when the client died


def test_a_warm_started_run_trains_the_same_weights_as_a_cold_one(tmp_path):
    """`--seeds` forks inside the served child: seeds, RNG streams and weights are those of a cold launch."""
    gin_file = tmp_path / "t.gin"
    gin_file.write_text(tiny_gin("train.method = @TeacherTraining()\nTeacherTraining.sample_steps = 8\n"
                                 "inference_ema_momentum.momentum = 0.9", total=256))
    launch = f"python -m tract_repro.launch {gin_file} --seeds 0 1 --parallel 2 --workdir {tmp_path}/{{}}/s{{{{seed}}}}"
    cold = subprocess.run([sys.executable, *launch.format("cold").split()[1:]], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert cold.returncode == 0, cold.stderr
    done = wrapped(f"{launch.format('warm')} > {tmp_path}/warm.out 2> {tmp_path}/warm.err && python -m warm_probe report < /dev/null",
                   tmp_path, env={"TQDM_DISABLE": "1"})
    assert done.returncode == 3, done.stderr
    assert json.loads(done.stdout)["served"] and "warm start skipped" not in (tmp_path / "warm.err").read_text()
    for seed in (0, 1):
        a = torch.load(tmp_path / "cold" / f"s{seed}" / "ema.pt", weights_only=True)
        b = torch.load(tmp_path / "warm" / f"s{seed}" / "ema.pt", weights_only=True)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_warm_started_entry_point_with_gin_configurables_binds_them_as_a_cold_one(tmp_path):
    """`python -m tract_repro.evaluation.classifier --gin ...`: its configurables are registered once, as __main__'s.
    One epoch falls short of the accuracy gate: both runs must stop at it with the same line."""
    cmd = "python -m tract_repro.evaluation.classifier --workdir {}/{} --gin 'train_classifier.epochs = 1'"
    cold = subprocess.run(["bash", "-c", cmd.format(tmp_path, "cold")], cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}"), timeout=300)
    done = wrapped(f"{cmd.format(tmp_path, 'warm')} 2> {tmp_path}/warm.err; echo $? > {tmp_path}/warm.status; "
                   "python -m warm_probe report < /dev/null", tmp_path)
    assert json.loads(done.stdout.splitlines()[-1])["served"], done.stderr
    assert cold.returncode == 2 and "held-out accuracy" in cold.stderr, cold.stderr
    assert ((tmp_path / "warm.status").read_text(), (tmp_path / "warm.err").read_text()) == ("2\n", cold.stderr)
