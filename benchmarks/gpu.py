"""Throughput, FLOPs, MFU, per-step overhead and peak memory of the training loop's steps and one-step sampling, on CUDA or the CPU.

    python benchmarks/gpu.py                      # every case, every precision option set, on the GPU
    python benchmarks/gpu.py --only cifar10_tract --batch 256 --options tf32+bf16
    python benchmarks/gpu.py --device cpu --threads 2 --options fp32 --batch 8 --steps 1 --only cifar10_tract cifar10_btd

A training case is a run file of gin/ built into the loop's own ``Run`` and timed step by step as
``Run.steps`` runs it (``Run.step`` + ``Run.after_step``: data batch, the step's random draws,
targets, student forward/backward, clip, Adam, self-teacher and inference EMA updates, metrics),
by ``benchmarks/run_step.py`` (see there for what it turns off: TensorBoard, checkpoints, grids;
random teacher weights and images).  The option sets bind the loop's Device options in gin:
fp32 (TF32 off), tf32, tf32+bf16 autocast, tf32+bf16+channels-last, and each with ``+compile``
(Device.compile; the warm-up steps pay the compilation and are not timed); ``fp32+noise``
(Device.noise = 'device'); ``tf32+bf16+fast`` (bf16, noise on the device, float32 targets) and its
``+compile``.
Prints one row per (case, options):

- samples/s and ms/step (median over ``--repeats`` blocks of ``--steps`` steps);
- GFLOP/sample: every FLOP of one step (the teacher's and self-teacher's passes, the student's
  forward and backward), counted by ``torch.utils.flop_counter.FlopCounterMode``;
- TFLOP/s achieved, and MFU against the device's dense peak for the precision in use (known GPUs,
  or ``--peak-tflops``);
- passes_ms: the step's network passes alone (every teacher-side forward the step made, without
  gradient, and the student's forward and backward, replayed on the step's own inputs);
  overhead_ms = step − passes (and as a fraction of the step): what the step costs beyond its
  networks; step_over_passes = step ÷ passes;
- peak memory: allocated GPU memory, or the process's peak resident memory on the CPU.
"""
import argparse
import gc
import json
import resource
import time

import torch
from tabulate import tabulate

import run_step
from tract_repro.sampling import registry

OPTIONS = {
    "fp32": dict(tf32=False),
    "tf32": dict(tf32=True),
    "tf32+bf16": dict(tf32=True, autocast="bf16"),
    "tf32+bf16+cl": dict(tf32=True, autocast="bf16", channels_last=True),
}
OPTIONS.update({f"{k}+compile": dict(v, compile=True) for k, v in list(OPTIONS.items())})
OPTIONS["fp32+noise"] = dict(tf32=False, noise="device")  # noise drawn on the device (Device.noise)
# every GPU-path option: bf16 networks, noise on the device, float32 targets (Device.precision), compiled networks
OPTIONS["tf32+bf16+fast"] = dict(tf32=True, autocast="bf16", noise="device", precision="float32")
OPTIONS["tf32+bf16+fast+compile"] = dict(OPTIONS["tf32+bf16+fast"], compile=True)

# Dense peak TFLOP/s per precision (vendor data sheets, SXM parts): MFU is reported against these.
PEAKS = {"H100": {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4}, "H200": {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4},
         "A100": {"fp32": 19.5, "tf32": 156.0, "bf16": 312.0}}
SAMPLING = {"cifar10_1step_sampling": "cifar10_teacher"}  # one-step DDIM sampling with the network of this case
CASES = [c for c in run_step.CASES if c != "digits_btd"] + list(SAMPLING)
BATCHES = {"cifar10_tract": 256, "cifar10_btd": 256, "cifar10_teacher": 256, "imagenet64_tract": 64,
           "cifar10_1step_sampling": 1024, "edm_cifar10_tract": 128, "digits_teacher": 128, "digits_tract": 128}


def precision(options):
    o = OPTIONS[options]
    return "bf16" if o.get("autocast") == "bf16" else "tf32" if o.get("tf32") else "fp32"


def measure_sampling(case, options, batch, steps, device, threads=None):
    """One-step DDIM sampling of ``batch`` samples with the inference EMA of the case's Run."""
    network_case = SAMPLING[case]
    run_file, data = run_step.CASES[network_case]
    bindings = run_step.case_bindings(batch, threads, device, OPTIONS[options])
    with run_step.built_run([run_file], bindings, data=data) as run:
        dev, grid = run.dev, run.grid
        net = run.state.inference_ema.module.eval()
        shape, parameters = run.data.shape, sum(p.numel() for p in net.parameters())
    del run  # the student, its optimiser and the other EMAs: only the sampled network stays
    gc.collect()
    cuda = dev.is_cuda
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    noise = torch.randn(batch, *shape, dtype=torch.float64).to(dev.device)

    def sample():
        with dev.autocast():
            registry.sample("ddim", net, grid, 1, noise)

    for _ in range(3):
        sample()
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        sample()
    sync()
    dt = (time.perf_counter() - t0) / steps
    return dict(case=case, batch=batch, device=str(dev.device), ms_per_step=1e3 * dt, samples_per_s=batch / dt,
                peak_GiB=(torch.cuda.max_memory_allocated() if cuda else
                          resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**30, parameters=parameters)


def measure(case, options, batch, steps, device="cuda", peak_tflops=None, threads=None, repeats=3, warmup=3):
    if case in SAMPLING:
        row = measure_sampling(case, options, batch, steps, device, threads)
        row["options"] = options
        return row
    row = run_step.measure_case(case, batch, threads, device, OPTIONS[options], steps=steps, repeats=repeats,
                                warmup=warmup)
    row["options"] = options
    cuda = row["device"].startswith("cuda")
    peak = peak_tflops or (PEAKS.get(next((g for g in PEAKS if g in torch.cuda.get_device_name()), ""), {})
                           .get(precision(options)) if cuda else None)
    row["mfu"] = None if not peak else row["tflop_per_s"] / peak
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", choices=CASES, default=CASES)
    parser.add_argument("--options", nargs="*", choices=list(OPTIONS), default=list(OPTIONS))
    parser.add_argument("--batch", type=int, help="override every case's batch")
    parser.add_argument("--steps", type=int, default=10, help="steps per timed block")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved timed blocks of steps and of network passes")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation, allocator)")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--threads", type=int, help="torch threads (train.threads; default: the run file's)")
    parser.add_argument("--peak-tflops", type=float, help="the device's dense peak for the precision in use (for MFU)")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU here: run with --device cpu (and a small --batch)")
    rows = []
    print(torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU", "torch", torch.__version__,
          flush=True)
    for case in args.only:
        for options in args.options:
            batch = args.batch or BATCHES[case]
            try:
                row = measure(case, options, batch, args.steps, args.device, args.peak_tflops, args.threads,
                              args.repeats, args.warmup)
            except torch.cuda.OutOfMemoryError:
                row = dict(case=case, options=options, batch=batch, ms_per_step=float("nan"),
                           samples_per_s=float("nan"), peak_GiB=float("nan"), parameters=None, note="out of memory")
            rows.append(row)
            print(json.dumps(row), flush=True)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    keys = ["case", "options", "batch", "threads", "samples_per_s", "ms_per_step", "passes_ms", "overhead_ms",
            "overhead_fraction", "gflop_per_sample", "tflop_per_s", "mfu", "peak_GiB"]
    print(tabulate([{k: r.get(k) for k in keys} for r in rows], headers="keys", floatfmt=".3g", tablefmt="github"))
    print("network calls per step: " + "; ".join(f"{r['case']}: {r['network_calls']}" for r in rows
                                                   if "network_calls" in r))
    print(f"for the benchmark: {run_step.CHANGED}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
