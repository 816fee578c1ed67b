"""GPU throughput and peak memory of the paper-scale training steps and one-step sampling.

    python benchmarks/gpu.py                      # every case, every precision option set
    python benchmarks/gpu.py --only cifar10_tract --batch 256

Cases use the real code paths: a method's target plus the loop's optimisation step (student
forward/backward, Adam, self-teacher and inference EMA updates), under the loop's Device
options.  Networks are randomly initialised (speed does not depend on the weights).
Option sets: fp32 (TF32 off), tf32, tf32+bf16 autocast, tf32+bf16+channels-last.
Prints one row per (case, options): samples/s, ms/step and peak allocated GPU memory.
"""
import argparse
import copy
import json
import time

import torch
from tabulate import tabulate

from tract_repro.diffusion.edm import EDMSchedule
from tract_repro.diffusion.grid import TimeGrid
from tract_repro.diffusion.schedules import CosineSchedule
from tract_repro.methods import TRACT, TeacherTraining
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


def vp(net_kwargs, parameterisation, T=1024):
    grid = TimeGrid(CosineSchedule(), T)
    return grid, build_denoiser(UNet(**net_kwargs), grid.schedule, parameterisation)


def edm_cifar():
    grid = TimeGrid(EDMSchedule(), 40)
    return grid, build_denoiser(edm_cifar10_ve(), grid.schedule, "edm")


CASES = {  # name: (builder, method, image shape, kind)
    "cifar10_tract": (lambda: vp(CIFAR_UNET, "x"), lambda: TRACT(schedule=(1024, 32, 1)), (3, 32, 32), "train"),
    "cifar10_1step_sampling": (lambda: vp(CIFAR_UNET, "x"), None, (3, 32, 32), "sample"),
    "edm_cifar10_tract": (edm_cifar, lambda: TRACT(schedule=(40, 1), teacher_step=heun_teacher_step, weighting="edm"),
                          (3, 32, 32), "train"),
    "digits_teacher": (lambda: vp(DIGITS_UNET, "v"), TeacherTraining, (1, 8, 8), "train"),
    "digits_tract": (lambda: vp(DIGITS_UNET, "v"), lambda: TRACT(schedule=(1024, 32, 1)), (1, 8, 8), "train"),
}


def measure(case, options, batch, steps):
    build, make_method, shape, kind = CASES[case]
    dev = Device("cuda", **OPTIONS[options])
    torch.manual_seed(0)
    grid, student = build()
    grid.to(dev.device)
    student = dev.prepare(student)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    gen = torch.Generator().manual_seed(0)
    x = (torch.rand(batch, *shape, dtype=torch.float64) * 2 - 1).to(dev.device)
    if kind == "sample":
        student.eval()
        noise = torch.randn(batch, *shape, dtype=torch.float64).to(dev.device)

        def step():
            with dev.autocast():
                registry.sample("ddim", student, grid, 1, noise)
    else:
        method = make_method()
        phase = plan_phases(method.steps(grid.T), total=10**9)[0]
        nets = Networks(copy.deepcopy(student).eval().requires_grad_(False))
        emas = [EMA(student, 0.999)]
        if method.self_teacher_momentum is not None:
            emas.insert(0, EMA(student, method.self_teacher_momentum))
            nets.self_teacher = emas[0].module
        opt = adam(student.parameters(), lr=1e-4)

        def step():
            with dev.autocast():
                target = method(x, None, phase, nets, grid, gen)
            optimisation_step(target, student, opt, 1e-4, 1.0, "sum", emas, dev.autocast)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / steps
    return dict(case=case, options=options, batch=batch, ms_per_step=1000 * dt, samples_per_s=batch / dt,
                peak_GiB=torch.cuda.max_memory_allocated() / 2**30,
                parameters=sum(p.numel() for p in student.parameters()))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", choices=list(CASES), default=list(CASES))
    parser.add_argument("--options", nargs="*", choices=list(OPTIONS), default=list(OPTIONS))
    parser.add_argument("--batch", type=int, help="override every case's batch")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/gpu.py needs a CUDA GPU; for CPU numbers run benchmarks/throughput.py")
    batches = {"cifar10_tract": 256, "cifar10_1step_sampling": 1024, "edm_cifar10_tract": 128,
               "digits_teacher": 128, "digits_tract": 128}
    rows = []
    print(torch.cuda.get_device_name(), "torch", torch.__version__, flush=True)
    for case in args.only:
        for options in args.options:
            try:
                row = measure(case, options, args.batch or batches[case], args.steps)
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
