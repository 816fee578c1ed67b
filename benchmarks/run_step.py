"""The training loop's own step, timed: ``Run.step`` + ``Run.after_step`` against its network passes alone.

    python benchmarks/run_step.py                                       # digits TRACT (the embedded default), CPU
    python benchmarks/run_step.py --case digits_teacher digits_tract --steps 20 --repeats 5
    python benchmarks/run_step.py --case cifar10_tract --batch 8 --threads 2 --steps 1 --repeats 3
    python benchmarks/run_step.py --case digits_tract --device cuda --steps 50 --json out.json

A case is a run file of gin/ (``CASES``).  The benchmark parses it with ``tract_repro.config.parse``
and builds the :class:`~tract_repro.training.loop.Run` as ``train()`` builds it (``Options``, gin's
``train.*``, checked; the single-process ``World``), in a temporary workdir, then ``run.resume()``.  What a benchmark cannot or should not do is changed through gin bindings only,
and printed with the results:

- TensorBoard, checkpoints and sample grids are off (``train.tensorboard = False``,
  ``train.checkpoint_every = None``, ``train.grid_every = None``); ``metrics.jsonl`` records
  are kept at the config's ``train.log_every``, as in training;
- the span is 1G samples (``train.total = '1G'``, ``train.phase_lengths = None``), so the timed
  steps stay inside the first phase (no phase change, no end-of-phase grid);
- a distillation's teacher is a randomly initialised copy of the run's network saved to the
  workdir, and CIFAR-10 / ImageNet 64x64 are random uint8 images in their published file formats
  (read by the real loaders); speed does not depend on the weights or the pixels.

Each timed step is what ``Run.steps`` does per step: ``controller.enter``, ``run.step`` (batch,
the step's random draws, targets, micro-batches, backward, clip, Adam, EMAs), the progress bar
(disabled) and ``run.after_step`` (metrics with their ``.item()``, the log record when due).
The network passes are recorded during a warm-up step (every call of the student, teacher and
self-teacher, with its inputs) and replayed alone: the teacher-side forwards without gradient,
the student's forward and backward.  So

    per-step overhead = step time − network-pass time

is everything the step costs beyond its networks.  Steps and passes are timed in interleaved
blocks (``--repeats`` of each, ``--steps`` long, in alternating order) after warm-up: the step and
pass times reported are the medians over blocks, the overhead the median over blocks of a block of
steps less its neighbouring block of passes (so that a machine whose speed drifts, e.g. shared
with other work, biases neither).  On CUDA the clock is read after ``torch.cuda.synchronize()``.
The same is reported in this process's CPU time (``cpu_*``: seconds of all its threads, from
``time.process_time``), which other processes on a shared CPU machine disturb less than the
wall clock (on CUDA it is the host's share, including the waits).
"""
import argparse
import contextlib
import json
import os
import pickle
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from tabulate import tabulate
from tqdm import tqdm

from tract_repro import config
from tract_repro.training import distributed, loop
from tract_repro.training.device import Device
from tract_repro.training.options import Options

ROOT = Path(__file__).resolve().parents[1]

# name: (run file, data written for it: None (the config's own, e.g. digits), 'cifar10' or 'imagenet64')
CASES = {
    "digits_teacher": ("gin/digits_teacher.gin", None),
    "digits_btd": ("gin/digits_btd.gin", None),
    "digits_tract": ("gin/digits_tract.gin", None),
    "cifar10_teacher": ("gin/cifar10_teacher.gin", "cifar10"),
    "cifar10_btd": ("gin/cifar10_btd.gin", "cifar10"),
    "cifar10_tract": ("gin/cifar10_tract.gin", "cifar10"),
    "edm_cifar10_tract": ("gin/cifar10_tract_edm.gin", "cifar10"),
    "imagenet64_tract": ("gin/imagenet64_tract.gin", "imagenet64"),
}
# What a benchmark turns off or changes (the output prints it).
QUIET = ("train.tensorboard = False", "train.checkpoint_every = None", "train.grid_every = None",
         "train.total = '1G'", "train.phase_lengths = None")
CHANGED = ("TensorBoard, checkpoints and sample grids off (train.tensorboard = False, train.checkpoint_every = None, "
           "train.grid_every = None); span 1G samples (the timed steps stay in the first phase); "
           "random teacher weights; CIFAR-10 / ImageNet 64x64 images random; metrics records kept")


def _fake_cifar10(root, images):
    """Five CIFAR-10 training batch files of random pixels under root/cifar-10-batches-py."""
    from torchvision.datasets import CIFAR10

    folder = Path(root) / CIFAR10.base_folder
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    per_file = max(1, -(-images // len(CIFAR10.train_list)))
    for name, _ in CIFAR10.train_list:
        batch = {b"data": rng.integers(0, 256, (per_file, 3072), dtype=np.uint8),
                 b"labels": [int(v) for v in rng.integers(0, 10, per_file)]}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)
    return ["cifar10.check_md5 = False"]


def _fake_imagenet64(root, images):
    """One published-format ImageNet 64x64 training batch (npz) of random pixels."""
    Path(root).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    np.savez(Path(root) / "train_data_batch_1.npz", data=rng.integers(0, 256, (images, 3 * 64 * 64), dtype=np.uint8),
             labels=rng.integers(1, 1001, images))
    return []


FAKE_DATA = {"cifar10": _fake_cifar10, "imagenet64": _fake_imagenet64}


def train_options(workdir, config_text):
    """The options ``train(workdir, config_text=...)`` makes of the parsed gin config before it builds the
    Run: ``train.*`` (:class:`~tract_repro.training.options.Options`) as bound, checked, and the device
    ``Device()`` when unbound."""
    options = Options(workdir=Path(workdir), pace=None, config_text=config_text).check()
    if options.device is None:
        options.device = Device()
    return options


def save_random_teacher(options, path):
    """A randomly initialised copy of the run's denoiser as a teacher weights file."""
    torch.manual_seed(12345)
    torch.save(options.build_denoiser(options.build_grid().schedule).state_dict(), path)
    return path


@contextlib.contextmanager
def built_run(files=(), bindings=(), text=None, data=None, data_images=1280):
    """A resumed Run of the config (``files`` + ``bindings``, or ``text``) in a temporary workdir, as training
    builds it, with the benchmark's bindings (``QUIET``) last; ``data``: the fake data set to write."""
    if distributed.world_from_env()[1] > 1:
        raise SystemExit("run the benchmark in one process (WORLD_SIZE is set above 1)")
    with tempfile.TemporaryDirectory(prefix="run_step_") as tmp:
        tmp = Path(tmp)
        extra = []
        if data is not None:
            extra = FAKE_DATA[data](tmp / data, data_images) + [f"DATA = '{tmp / data}'"]
        files = [str(ROOT / f) if not Path(f).is_absolute() and (ROOT / f).is_file() else str(f) for f in files]
        if text is not None:
            text = "\n".join([text, *bindings, *extra, *QUIET])
            config_text = config.parse([], [], text=text)
        else:
            config_text = config.parse(files, [*bindings, *extra, *QUIET])
        options = train_options(tmp / "run", config_text)
        if options.method.needs_teacher:
            options.teacher = str(save_random_teacher(options, tmp / "teacher.pt"))
        run = loop.Run(options, distributed.World())
        run.resume()
        try:
            yield run
        finally:
            run.board.close()


def _record_network_calls(run, fn):
    """Run ``fn`` (one step) and return every call of the run's networks in it: (name, module, args, kwargs, grad)."""
    state = run.state
    nets = {"student": state.student, "teacher": state.nets.teacher, "self_teacher": state.nets.self_teacher}
    calls, handles = [], []
    for name, module in nets.items():
        if module is None:
            continue

        def hook(mod, args, kwargs, name=name):
            calls.append((name, mod, args, kwargs, torch.is_grad_enabled()))
        handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        fn()
    finally:
        for h in handles:
            h.remove()
    return calls


def _replay(run, calls):
    """The recorded network calls alone: forwards without gradient, and the student's forward and backward."""
    for _, module, args, kwargs, grad in calls:
        with run.dev.autocast(), torch.set_grad_enabled(grad):
            out = module(*args, **kwargs)
        if grad and out.requires_grad:
            out.float().square().sum().backward()
    run.state.student.zero_grad(set_to_none=True)


def _describe_calls(calls):
    counts = {}
    for name, _, _, _, grad in calls:
        key = f"{name} fwd+bwd" if grad and name == "student" else f"{name} fwd"
        counts[key] = counts.get(key, 0) + 1
    return ", ".join(f"{k} ×{v}" for k, v in counts.items())


def time_run_step(run, steps=5, repeats=3, warmup=2, passes=True, flops=True):
    """Time ``steps`` loop steps of ``run`` in each of ``repeats`` blocks (after ``warmup`` steps), and as
    many replays of the step's network passes in blocks interleaved with them; a dict of the medians."""
    from torch.utils.flop_counter import FlopCounterMode

    o, dev = run.o, run.dev
    sync = torch.cuda.synchronize if dev.is_cuda else (lambda: None)
    bar = tqdm(disable=True)
    first = run.state.samples
    needed = (max(warmup, 1) + steps * repeats) * o.batch_size
    phase0 = run.controller.enter(run.state)
    if first + needed > min(phase0.end, run.end):
        raise SystemExit(f"{steps * repeats} timed steps would reach the end of the phase at sample {phase0.end}: "
                         f"time fewer steps or lengthen the span")
    if dev.is_cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()

    def one_step():  # what Run.steps does per step (its pace is None here)
        phase = run.controller.enter(run.state)
        before = run.state.samples
        out = run.step(phase)
        bar.update(o.batch_size)
        run.after_step(before, phase, *out, bar)

    run.tick = time.perf_counter()  # set by Run.steps before its first step
    counter = FlopCounterMode(display=False) if flops else contextlib.nullcontext()
    with counter:  # the first warm-up step: its FLOPs and its network calls
        calls = _record_network_calls(run, one_step)
    for _ in range(warmup - 1):
        one_step()
    if passes:
        _replay(run, calls)
    def block(fn):  # (wall seconds, this process's CPU seconds over all its threads) per call
        sync()
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(steps):
            fn()
        sync()
        return (time.perf_counter() - t0) / steps, (time.process_time() - c0) / steps

    step_blocks, pass_blocks = [], []
    for r in range(repeats):  # interleaved, and in alternating order, so that drifts in the machine's speed cancel
        if passes and r % 2:
            pass_blocks.append(block(lambda: _replay(run, calls)))
        step_blocks.append(block(one_step))
        if passes and not r % 2:
            pass_blocks.append(block(lambda: _replay(run, calls)))
    step_times = [w for w, _ in step_blocks]
    dt = statistics.median(step_times)
    row = dict(batch=o.batch_size, device=str(dev.device), threads=torch.get_num_threads(), steps=steps,
               repeats=repeats, ms_per_step=1e3 * dt, samples_per_s=o.batch_size / dt,
               ms_per_step_blocks=[round(1e3 * t, 2) for t in step_times], network_calls=_describe_calls(calls),
               cpu_ms_per_step=1e3 * statistics.median(c for _, c in step_blocks))
    if passes:
        pass_times = [w for w, _ in pass_blocks]
        dp = statistics.median(pass_times)
        pairs = [s - p for s, p in zip(step_times, pass_times)]  # each block of steps less its neighbouring passes
        overhead = statistics.median(pairs)
        cpu_pass = statistics.median(c for _, c in pass_blocks)
        cpu_overhead = statistics.median(s[1] - p[1] for s, p in zip(step_blocks, pass_blocks))
        row.update(passes_ms=1e3 * dp, passes_ms_blocks=[round(1e3 * t, 2) for t in pass_times],
                   overhead_ms=1e3 * overhead, overhead_fraction=overhead / dt, step_over_passes=dt / dp,
                   overhead_ms_blocks=[round(1e3 * t, 2) for t in pairs], cpu_passes_ms=1e3 * cpu_pass,
                   cpu_overhead_ms=1e3 * cpu_overhead, cpu_overhead_fraction=cpu_overhead / (row["cpu_ms_per_step"] / 1e3))
    if flops:
        per_step = counter.get_total_flops()
        row.update(gflop_per_sample=per_step / o.batch_size / 1e9, tflop_per_s=per_step / dt / 1e12)
    row.update(peak_GiB=(torch.cuda.max_memory_allocated() if dev.is_cuda else
                         resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**30,
               parameters=sum(p.numel() for p in run.state.student.parameters()),
               samples_trained=run.state.samples - first)
    return row


def case_bindings(batch=None, threads=None, device=None, device_options=None):
    """gin bindings for a case: the batch, torch threads, and the Device (name plus options such as tf32=True)."""
    out = [] if batch is None else [f"train.batch_size = {int(batch)}"]
    out += [] if threads is None else [f"train.threads = {int(threads)}"]
    if device is not None or device_options:
        out += ["train.device = @Device()"] + ([] if device is None else [f"Device.name = {device!r}"])
        out += [f"Device.{k} = {v!r}" for k, v in (device_options or {}).items()]
    return out


def measure_case(case, batch=None, threads=None, device=None, device_options=None, bindings=(), **timing):
    """``time_run_step`` on the Run of a case of ``CASES``; the row names the case and what was changed."""
    run_file, data = CASES[case]
    extra = case_bindings(batch, threads, device, device_options) + list(bindings)
    images = max(1280, 2 * (batch or 256))
    with built_run([run_file], extra, data=data, data_images=images) as run:
        row = dict(case=case, run_file=run_file, **time_run_step(run, **timing))
    row["changed"] = CHANGED
    return row


def print_rows(rows):
    keys = ["case", "batch", "threads", "ms_per_step", "passes_ms", "overhead_ms", "overhead_fraction",
            "cpu_ms_per_step", "cpu_overhead_ms", "samples_per_s", "gflop_per_sample", "peak_GiB"]
    print(tabulate([{k: r.get(k) for k in keys} for r in rows], headers="keys", floatfmt=".3g", tablefmt="github"))
    print("\nnetwork calls per step: " + "; ".join(f"{r['case']}: {r['network_calls']}" for r in rows))
    print(f"for the benchmark: {CHANGED}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", nargs="+", choices=list(CASES), default=["digits_tract"])
    parser.add_argument("--batch", type=int, help="train.batch_size (default: the run file's)")
    parser.add_argument("--threads", type=int, help="train.threads (default: the run file's)")
    parser.add_argument("--device", help="Device.name: cpu, cuda, ... (default: the run file's)")
    parser.add_argument("--gin", action="append", default=[], help="a further binding, e.g. \"Device.tf32 = True\"")
    parser.add_argument("--steps", type=int, default=5, help="steps per timed block")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved blocks of steps and of passes")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    os.environ.setdefault("TQDM_DISABLE", "1")
    rows = []
    for case in args.case:
        rows.append(measure_case(case, args.batch, args.threads, args.device, bindings=args.gin, steps=args.steps,
                                 repeats=args.repeats, warmup=args.warmup))
        print(json.dumps(rows[-1]), flush=True)
    print_rows(rows)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
