"""Before and after, in one run, for the digits pipeline's CPU speed-ups (2-core machine).

    python benchmarks/digits_overheads.py            # all cases
    python benchmarks/digits_overheads.py --only adam startup

Cases (each prints its before and after):
* ``step``: the loop's digits TRACT step (``gin/digits_tract.gin``, batch 128, 1 thread; ``Run.step`` +
  ``Run.after_step``, ``benchmarks/run_step.py``) against its network passes alone: the per-step
  overhead of batching, random draws, targets, Adam, EMAs and metrics.
* ``adam``: one digits step's Adam update, per-parameter loop vs multi-tensor (``adam.foreach``), on
  the student of a digits teacher ``Run`` after one real loop step.
* ``ema``: one EMA update, per-parameter ``lerp_`` loop vs ``torch._foreach_lerp_``, on the same student.
* ``startup``: a run's process start (import, config, data, networks, optimiser, first step), as a
  fresh interpreter (submitit's local jobs, the old ``--seeds``) vs forked from a launcher that has
  imported everything (``--seeds`` now).
* ``exit``: a stage process's import and exit (what the launcher, evaluate and the table stage
  do besides their work), with the interpreter's normal teardown vs ``tract_repro.launching.process.exit_now``.
* ``pacing``: a digits TRACT stage (3 seeds × 4K samples, ``--seeds 0 1 2 --parallel 3``) with its
  seeds paced (``tract_repro.launching.pacing``) and with ``--no-pace``: wall time and how long the
  last seed ran alone.
* ``warm``: stage processes started cold (``python -m tract_repro.launch ...`` as DVC runs them) and
  under ``python -m tract_repro.warm`` (``make digits``), which forks them from a server that has
  imported torch, torch._dynamo and clean-fid: ``--help`` of the launcher and of evaluate, and a digits
  TRACT stage (3 seeds × 2K samples); each the min of 3 in a row, the server started once per row.
* ``sampling``: an evaluation's sampling (the digits UNet, 64 DDIM steps × 500 seeds, as the teacher's
  evaluation at 1024/64/8/2/1 steps does at more steps), one process on 2 threads vs two forked
  one-thread workers (``evaluate --workers 2``), each in a fresh interpreter.
* ``teacher``: digits-teacher samples/s, one process on 2 threads vs two one-thread data-parallel
  ranks (``local_executor.tasks_per_node = 2``), 12,800 samples each.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from tabulate import tabulate

ROOT = Path(__file__).resolve().parents[1]
DIGITS_NET = dict(in_channels=1, resolution=8, channels=16, emb_channels=64, channel_mult=(1, 2),
                  num_res_blocks=1, attn_resolutions=(4,), norm_groups=8)  # gin/digits/base.gin, for the sampling case


def _digits_student():
    """The student of a digits teacher Run (gin/digits_teacher.gin, batch 128) after one loop step: its .grad is set."""
    import run_step

    with run_step.built_run(["gin/digits_teacher.gin"], run_step.case_bindings(128, 1, "cpu")) as run:
        run.step(run.controller.enter(run.state))
        return run.state.student


def step_case(steps=10, repeats=5):
    import run_step

    row = run_step.measure_case("digits_tract", threads=1, device="cpu", steps=steps, repeats=repeats)
    label = f"digits TRACT step, batch {row['batch']}, 1 thread"
    blocks = f"median of {repeats} blocks of {steps}"
    return [(f"{label}: Run.step + after_step", f"{row['ms_per_step']:.1f} ms ({blocks})"),
            (f"{label}: its network passes alone ({row['network_calls']})", f"{row['passes_ms']:.1f} ms ({blocks})"),
            (f"{label}: per-step overhead (step − passes)",
             f"{row['overhead_ms']:.1f} ms ({100 * row['overhead_fraction']:.0f}% of the step)")]


def _time(fn, repeats=50):
    for _ in range(5):
        fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats * 1e3


def adam_case():
    torch.set_num_threads(1)
    net = _digits_student()
    rows = []
    for foreach in (False, True):
        optimizer = torch.optim.Adam(net.parameters(), lr=1e-4, foreach=foreach)
        rows.append((f"Adam update, foreach={foreach}", f"{_time(optimizer.step):.2f} ms"))
    return rows


def ema_case():
    from tract_repro.methods.ema import EMA

    torch.set_num_threads(1)
    net = _digits_student()
    ema = EMA(net, 0.999)
    pairs = list(zip(ema.module.parameters(), net.parameters()))

    def loop():
        with torch.no_grad():
            for p, q in pairs:
                p.lerp_(q, 0.001)
    return [("EMA update, per-parameter loop", f"{_time(loop):.2f} ms"),
            ("EMA update, foreach (EMA.update)", f"{_time(lambda: ema.update(net)):.2f} ms")]


STARTUP = """
import sys, time
t0 = time.perf_counter()
from tract_repro import config
from tract_repro.training.loop import train
config.parse(["gin/digits_teacher.gin"], ["TOTAL = 64", "train.threads = 1", "train.grid_every = None",
             "train.grid_size = 1"])
train(sys.argv[1])
print(time.perf_counter() - t0)
"""


# What `launch --seeds` does now: the launcher imports, then forks the run; the child's wall time is printed.
FORKED = (
        "import sys, time, multiprocessing as mp\n"
        "from tract_repro import config\n"
        "import torch._dynamo\n"
        "from tract_repro.training.loop import train\n"
        "def job(w):\n"
        "    config.parse(['gin/digits_teacher.gin'], ['TOTAL = 64', 'train.threads = 1', 'train.grid_every = None',"
        " 'train.grid_size = 1'])\n"
        "    train(w)\n"
        "t0 = time.perf_counter()\n"
        "p = mp.get_context('fork').Process(target=job, args=(sys.argv[1],)); p.start(); p.join()\n"
        "print(time.perf_counter() - t0)\n")


def startup_case(repeats=3):
    env = dict(os.environ, TQDM_DISABLE="1", OMP_NUM_THREADS="1")
    rows = []
    for label, code in (("run start, fresh interpreter (wall)", STARTUP),
                        ("run start, forked from the launcher (child's wall)", FORKED)):
        times = []
        for _ in range(repeats):
            with tempfile.TemporaryDirectory() as tmp:
                t0 = time.perf_counter()
                out = subprocess.run([sys.executable, "-c", code, tmp], cwd=ROOT, env=env, capture_output=True,
                                     text=True, check=True)
                whole = time.perf_counter() - t0
                times.append(float(out.stdout.strip().splitlines()[-1]) if "forked" in label else whole)
        rows.append((label, f"{min(times):.2f} s (min of {repeats})"))
    return rows


EXIT = {"normal exit (sys.exit)": "import sys\n{imports}\nsys.exit(0)\n",
        "exit_now (no teardown)": "{imports}\nfrom tract_repro.launching.process import exit_now\nexit_now(0)\n"}


def exit_case(repeats=5):
    rows = []
    for what, imports in (("launcher", "import tract_repro.launch, torch._dynamo"), ("evaluate", "import tract_repro.evaluate")):
        for label, code in EXIT.items():
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                subprocess.run([sys.executable, "-c", code.format(imports=imports)], cwd=ROOT, check=True)
                times.append(time.perf_counter() - t0)
            rows.append((f"{what} import + {label}", f"{min(times):.2f} s (min of {repeats})"))
    return rows


def pacing_case(repeats=2):
    env = dict(os.environ, TQDM_DISABLE="1")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "tract_repro.launch", "gin/digits_teacher.gin", "--gin", "TOTAL = '2K'",
                        "--gin", "train.grid_every = None", "--workdir", f"{tmp}/teacher"], cwd=ROOT, env=env,
                       capture_output=True, check=True)
        for label, extra in (("seeds paced", []), ("seeds unpaced (--no-pace)", ["--no-pace"])):
            walls, alone = [], []
            for r in range(repeats):
                cmd = [sys.executable, "-u", "-m", "tract_repro.launch", "gin/digits_tract.gin", "--gin", f"TEACHER = '{tmp}/teacher'",
                       "--gin", "TOTAL = '8K'", "--gin", "train.only_phase = 0", "--seeds", "0", "1", "2", "--parallel", "3",
                       *extra, "--workdir", f"{tmp}/{len(extra)}_{r}/s{{seed}}"]
                t0, done = time.perf_counter(), []
                with subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True) as proc:
                    for line in proc.stdout:
                        if line.startswith("done:"):
                            done.append(time.perf_counter())
                walls.append(time.perf_counter() - t0)
                alone.append(done[-1] - done[-2])
            rows.append((f"TRACT stage, 3 seeds on this machine's cores, {label}",
                         f"{min(walls):.1f} s wall (min of {repeats}); last seed alone {sum(alone) / repeats:.1f} s (mean)"))
    return rows


WARM_TIMER = """
import subprocess, sys, time
times = []
for i in range(int(sys.argv[1])):
    t0 = time.perf_counter()
    subprocess.run([a.replace("{i}", str(i)) for a in sys.argv[2:]], check=True, stdout=subprocess.DEVNULL)
    times.append(time.perf_counter() - t0)
print(*times)
"""


def warm_case(repeats=3):
    """Each timer runs a stage command ``repeats`` times in a row: cold, then under one warm server (its
    first call also waits for the server's imports, which overlap the command's start in a pipeline)."""
    env = dict(os.environ, TQDM_DISABLE="1", PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "tract_repro.launch", "gin/digits_teacher.gin", "--gin", "TOTAL = '2K'",
                        "--gin", "train.grid_every = None", "--workdir", f"{tmp}/teacher"], cwd=ROOT, env=env,
                       capture_output=True, check=True)
        stages = {"launcher --help": ["python", "-m", "tract_repro.launch", "--help"],
                  "evaluate --help": ["python", "-m", "tract_repro.evaluate", "--help"],
                  "TRACT stage, 3 seeds × 2K samples": [
                      "python", "-m", "tract_repro.launch", "gin/digits_tract.gin", "--gin", f"TEACHER = '{tmp}/teacher'",
                      "--gin", "TOTAL = '2K'", "--gin", "train.only_phase = 0", "--seeds", "0", "1", "2", "--parallel", "3"]}
        for what, cmd in stages.items():
            for label, prefix in (("cold", []), ("warm", [sys.executable, "-m", "tract_repro.warm", "--"])):
                workdir = ["--workdir", f"{tmp}/{label}{{i}}/s{{seed}}"] if "stage" in what else []
                out = subprocess.run([*prefix, sys.executable, "-c", WARM_TIMER, str(repeats), *cmd, *workdir], cwd=ROOT,
                                     env=env, capture_output=True, text=True, check=True)
                times = [float(t) for t in out.stdout.split()]
                rows.append((f"{what}, {label}", f"{min(times):.2f} s (min of {repeats}; first {times[0]:.2f} s)"))
    return rows


SAMPLING = """
import sys, time, torch
from tract_repro.diffusion.grid import TimeGrid
from tract_repro.diffusion.schedules import CosineSchedule
from tract_repro.evaluation.generate import generate
from tract_repro.networks.denoiser import VPDenoiser
from tract_repro.networks.unet import UNet
threads, workers = int(sys.argv[1]), int(sys.argv[2])
torch.set_num_threads(threads)
torch.manual_seed(0)
denoiser = VPDenoiser(UNet(**{net}), CosineSchedule(), "v").eval()
t0 = time.perf_counter()
generate(denoiser, TimeGrid(CosineSchedule(), 1024), 64, range(500), (1, 8, 8), workers=workers)
print(time.perf_counter() - t0)
"""


def sampling_case(repeats=3):
    env = dict(os.environ, TQDM_DISABLE="1")
    rows = []
    for label, threads, workers in (("1 process × 2 threads", 2, 1), ("2 forked one-thread workers", 1, 2)):
        times = [float(subprocess.run([sys.executable, "-c", SAMPLING.format(net=DIGITS_NET), str(threads), str(workers)],
                                      cwd=ROOT, env=env, capture_output=True, text=True, check=True).stdout)
                 for _ in range(repeats)]
        rows.append((f"sampling 64 steps × 500 seeds, {label}",
                     f"{min(times):.2f} s (min of {repeats}; {64 * 500 / min(times):.0f} sample-steps/s)"))
    return rows


def teacher_case(samples=12800):
    env = dict(os.environ, TQDM_DISABLE="1")
    rows = []
    for label, extra in (("digits teacher, 1 process × 2 threads", ["--gin", "train.threads = 2"]),
                         ("digits teacher, 2 ranks × 1 thread (gloo)",
                          ["--gin", "train.threads = 1", "--gin", "local_executor.tasks_per_node = 2", "--executor", "local"])):
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [sys.executable, "-m", "tract_repro.launch", "gin/digits_teacher.gin", "--gin", f"TOTAL = {samples}",
                   "--gin", "train.log_every = 3200", "--gin", "train.grid_every = None", *extra, "--workdir", f"{tmp}/run"]
            subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, check=True)
            rates = [json.loads(line)["samples_per_s"] for line in Path(f"{tmp}/run/metrics.jsonl").read_text().splitlines()]
        rows.append((label, f"{sum(rates[1:]) / len(rates[1:]):.0f} samples/s (log intervals 2-{len(rates)})"))
    return rows


CASES = {"step": step_case, "adam": adam_case, "ema": ema_case, "startup": startup_case, "exit": exit_case, "pacing": pacing_case,
         "warm": warm_case, "sampling": sampling_case, "teacher": teacher_case}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=list(CASES), default=list(CASES))
    args = parser.parse_args()
    rows = []
    for name in args.only:
        new = CASES[name]()
        rows += new
        print(tabulate(new, tablefmt="plain"), flush=True)
    print()
    print(tabulate(rows, headers=["case", "measured"], tablefmt="github"))


if __name__ == "__main__":
    sys.exit(main())
