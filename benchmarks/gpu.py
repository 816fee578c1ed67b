"""Throughput, FLOPs, MFU and peak memory of the paper-scale training steps and one-step sampling, on CUDA or the CPU.

    python benchmarks/gpu.py                      # every case, every precision option set, on the GPU
    python benchmarks/gpu.py --only cifar10_tract --batch 256 --options tf32+bf16
    python benchmarks/gpu.py --device cpu --options fp32 --batch 8 --steps 2 --only cifar10_tract cifar10_btd

Cases use the real code paths: a method's target plus the loop's optimisation step (student
forward/backward, Adam, self-teacher and inference EMA updates), under the loop's Device
options.  Networks are randomly initialised (speed does not depend on the weights).
Option sets: fp32 (TF32 off), tf32, tf32+bf16 autocast, tf32+bf16+channels-last, and each with
``+compile`` (Device.compile; the first steps pay the compilation and are not timed); ``fp32+noise``
(Device.noise = 'device'); ``tf32+bf16+fast`` (bf16, noise on the device, float32 targets) and its
``+compile``.
Prints one row per (case, options):

- samples/s and ms/step;
- GFLOP/sample: every FLOP of one step (the teacher's and self-teacher's passes, the student's
  forward and backward), counted by ``torch.utils.flop_counter.FlopCounterMode``;
- TFLOP/s achieved, and MFU against the device's dense peak for the precision in use (known GPUs,
  or ``--peak-tflops``);
- passes: the step's time ÷ the time of its network passes measured alone (the teacher-side
  forwards without gradient and the student's forward and backward on the same batch); 1.0 means
  the step costs nothing beyond its networks;
- peak memory: allocated GPU memory, or the process's peak resident memory on the CPU.
"""
import argparse
import copy
import json
import resource
import time

import torch
from tabulate import tabulate

from tract_repro.diffusion.edm import EDMSchedule
from tract_repro.diffusion.grid import TimeGrid
from tract_repro.diffusion.schedules import CosineSchedule
from tract_repro.methods import BTD, TRACT, TeacherTraining
from tract_repro.methods.base import Networks
from tract_repro.methods.ema import EMA
from tract_repro.sampling.heun import heun_teacher_step
from tract_repro.methods.phases import plan_phases
from tract_repro.networks.denoiser import build_denoiser
from tract_repro.networks.edm_unets import edm_cifar10_ve
from tract_repro.networks.unet import UNet
from tract_repro.sampling import registry
from tract_repro.training.device import Device
from tract_repro.training.optim import adam
from tract_repro.training.step import optimisation_step

CIFAR_UNET = dict(in_channels=3, resolution=32, channels=256, emb_channels=1024, channel_mult=(1, 1, 1),
                  num_res_blocks=3, attn_resolutions=(16, 8), attn_heads=1, num_outputs=1)
DIGITS_UNET = dict(in_channels=1, resolution=8, channels=16, emb_channels=128, channel_mult=(1, 2),
                   num_res_blocks=2, attn_resolutions=(4,), norm_groups=8)
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


IMAGENET64_UNET = dict(in_channels=3, resolution=64, channels=192, emb_channels=768, channel_mult=(1, 2, 3, 4),
                       num_res_blocks=3, attn_resolutions=(32, 16, 8), attn_head_dim=64, num_outputs=2, num_classes=1000)
# Dense peak TFLOP/s per precision (vendor data sheets, SXM parts): MFU is reported against these.
PEAKS = {"H100": {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4}, "H200": {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4},
         "A100": {"fp32": 19.5, "tf32": 156.0, "bf16": 312.0}}


def vp(net_kwargs, parameterisation, T=1024):
    grid = TimeGrid(CosineSchedule(), T)
    return grid, build_denoiser(UNet(**net_kwargs), grid.schedule, parameterisation)


def edm_cifar():
    grid = TimeGrid(EDMSchedule(), 40)
    return grid, build_denoiser(edm_cifar10_ve(), grid.schedule, "edm")


CASES = {  # name: (builder, method, image shape, kind)
    "cifar10_tract": (lambda: vp(CIFAR_UNET, "x"), lambda: TRACT(schedule=(1024, 32, 1)), (3, 32, 32), "train"),
    "cifar10_btd": (lambda: vp(CIFAR_UNET, "x"), lambda: BTD(), (3, 32, 32), "train"),
    "cifar10_teacher": (lambda: vp(CIFAR_UNET, "x"), TeacherTraining, (3, 32, 32), "train"),
    "imagenet64_tract": (lambda: vp(IMAGENET64_UNET, "both"), lambda: TRACT(schedule=(1024, 32, 1)), (3, 64, 64), "train"),
    "cifar10_1step_sampling": (lambda: vp(CIFAR_UNET, "x"), None, (3, 32, 32), "sample"),
    "edm_cifar10_tract": (edm_cifar, lambda: TRACT(schedule=(40, 1), teacher_step=heun_teacher_step, weighting="edm"),
                          (3, 32, 32), "train"),
    "digits_teacher": (lambda: vp(DIGITS_UNET, "v"), TeacherTraining, (1, 8, 8), "train"),
    "digits_tract": (lambda: vp(DIGITS_UNET, "v"), lambda: TRACT(schedule=(1024, 32, 1)), (1, 8, 8), "train"),
}


def precision(options):
    o = OPTIONS[options]
    return "bf16" if o.get("autocast") == "bf16" else "tf32" if o.get("tf32") else "fp32"


def measure(case, options, batch, steps, device="cuda", peak_tflops=None):
    from torch.utils.flop_counter import FlopCounterMode

    from tract_repro.common.batch_random import StepRandom, step_generator

    build, make_method, shape, kind = CASES[case]
    dev = Device(device, **OPTIONS[options])
    cuda = dev.is_cuda
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    torch.manual_seed(0)
    grid, student = build()
    grid.to(dev.device)
    student = dev.prepare(student)
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    gen = torch.Generator().manual_seed(0)
    x = (torch.rand(batch, *shape, dtype=torch.float64) * 2 - 1).to(dev.device, dev.dtype)
    labels = torch.randint(0, 1000, (batch,)).to(dev.device) if student.conditional else None
    if kind == "sample":
        student.eval()
        dev.compile_networks(student)
        noise = torch.randn(batch, *shape, dtype=torch.float64).to(dev.device)

        def step():
            with dev.autocast():
                registry.sample("ddim", student, grid, 1, noise, labels)
        passes = None
    else:
        method = make_method()
        phase = plan_phases(method.steps(grid.T), total=10**9)[0]
        nets = Networks(copy.deepcopy(student).eval().requires_grad_(False))
        emas = [EMA(student, 0.999)]
        if method.self_teacher_momentum is not None:
            emas.insert(0, EMA(student, method.self_teacher_momentum))
            nets.self_teacher = emas[0].module
        dev.compile_networks(student, nets.teacher, nets.self_teacher)
        opt = adam(student.parameters(), lr=1e-4)
        counter = [0]

        def step():
            counter[0] += 1
            rng = gen if dev.noise == "cpu" else StepRandom(step_generator(0, counter[0], dev.device), batch).slice()
            with dev.autocast():
                target = method(x, labels, phase, nets, grid, rng)
            optimisation_step(target, student, opt, 1e-4, 1.0, "sum", emas, dev.autocast)

        calls = {"tract": 2, "btd": 2}.get(case.split("_")[-1], 0)  # the teacher-side forwards a target makes
        logsnr = grid.logsnr[torch.full((batch,), grid.T // 2, dtype=torch.long, device=grid.logsnr.device)]

        def passes():
            with dev.autocast():
                with torch.no_grad():
                    for _ in range(calls):
                        nets.teacher(x, logsnr, labels)
                out = student(x, logsnr, labels)
                out.float().square().sum().backward()
            student.zero_grad(set_to_none=True)

    def timed(fn, n):
        for _ in range(3):
            fn()
        sync()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        sync()
        return (time.perf_counter() - t0) / n

    with FlopCounterMode(display=False) as flops:
        step()
    per_step = flops.get_total_flops()
    dt = timed(step, steps)
    ratio = None if passes is None else dt / timed(passes, steps)
    peak = peak_tflops or (PEAKS.get(next((g for g in PEAKS if g in torch.cuda.get_device_name()), ""), {})
                           .get(precision(options)) if cuda else None)
    achieved = per_step / dt / 1e12
    return dict(case=case, options=options, batch=batch, ms_per_step=1000 * dt, samples_per_s=batch / dt,
                gflop_per_sample=per_step / batch / 1e9, tflop_per_s=achieved,
                mfu=None if not peak else achieved / peak, step_over_passes=ratio,
                peak_GiB=(torch.cuda.max_memory_allocated() if cuda else
                          resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**30,
                parameters=sum(p.numel() for p in student.parameters()))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", choices=list(CASES), default=list(CASES))
    parser.add_argument("--options", nargs="*", choices=list(OPTIONS), default=list(OPTIONS))
    parser.add_argument("--batch", type=int, help="override every case's batch")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--json", help="also write the rows to this JSON file")
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--threads", type=int, help="torch threads on the CPU")
    parser.add_argument("--peak-tflops", type=float, help="the device's dense peak for the precision in use (for MFU)")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU here: run with --device cpu (and a small --batch)")
    if args.threads:
        torch.set_num_threads(args.threads)
    batches = {"cifar10_tract": 256, "cifar10_btd": 256, "cifar10_teacher": 256, "imagenet64_tract": 64,
               "cifar10_1step_sampling": 1024, "edm_cifar10_tract": 128, "digits_teacher": 128, "digits_tract": 128}
    rows = []
    print(torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU, {torch.get_num_threads()} threads",
          "torch", torch.__version__, flush=True)
    for case in args.only:
        for options in args.options:
            try:
                row = measure(case, options, args.batch or batches[case], args.steps, args.device, args.peak_tflops)
            except torch.cuda.OutOfMemoryError:
                row = dict(case=case, options=options, batch=args.batch or batches[case], ms_per_step=float("nan"),
                           samples_per_s=float("nan"), peak_GiB=float("nan"), parameters=None, note="out of memory")
            rows.append(row)
            print(json.dumps(row), flush=True)
            torch.cuda.empty_cache()
    print(tabulate(rows, headers="keys", floatfmt=".1f", tablefmt="github"))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
