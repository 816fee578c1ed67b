"""Training throughput (samples/s) and peak memory of teacher, BTD and TRACT steps.

    python benchmarks/throughput.py                    # digits (batch 128, 1 thread) + CIFAR-10 config (batch 8)
    python benchmarks/throughput.py --only cifar10 --cifar-batch 16 --cifar-threads 2

Each case runs in a fresh process (so its peak memory is its own), times the real
optimisation step of the training loop (method target + student step + EMA updates) after
warm-up, and prints one row.  Networks are randomly initialised: speed doesn't depend on
the weights.
"""
import argparse
import copy
import multiprocessing as mp
import resource
import time

import torch
from tabulate import tabulate

from tract_repro.diffusion.grid import TimeGrid
from tract_repro.diffusion.schedules import CosineSchedule
from tract_repro.methods import BTD, TRACT, TeacherTraining
from tract_repro.methods.base import Networks
from tract_repro.methods.ema import EMA
from tract_repro.methods.phases import plan_phases
from tract_repro.networks.denoiser import VPDenoiser
from tract_repro.networks.unet import UNet
from tract_repro.training.optim import adam
from tract_repro.training.step import optimisation_step

NETS = {
    "digits": dict(in_channels=1, resolution=8, channels=16, emb_channels=64, channel_mult=(1, 2),
                   num_res_blocks=1, attn_resolutions=(4,), norm_groups=8),  # gin/digits/base.gin
    "cifar10": dict(in_channels=3, resolution=32, channels=256, emb_channels=1024, channel_mult=(1, 1, 1),
                    num_res_blocks=3, attn_resolutions=(16, 8), attn_heads=1),
}
PARAM = {"digits": "v", "cifar10": "x"}
METHODS = {
    "teacher": lambda: TeacherTraining(),
    "btd": lambda: BTD(),
    "tract": lambda: TRACT(schedule=(1024, 32, 1)),
}


def measure(scale, method_name, batch, steps, threads, queue):
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    grid = TimeGrid(CosineSchedule(), 1024)
    net = UNet(**NETS[scale])
    student = VPDenoiser(net, grid.schedule, PARAM[scale])
    method = METHODS[method_name]()
    phase = plan_phases(method.steps(1024), total=10**9)[0]
    nets = Networks(copy.deepcopy(student).eval(), copy.deepcopy(student).eval())
    emas = [EMA(student, 0.5), EMA(student, 0.999)]
    opt = adam(student.parameters(), lr=1e-4)
    c, r = NETS[scale]["in_channels"], NETS[scale]["resolution"]
    x = torch.rand(batch, c, r, r, dtype=torch.float64) * 2 - 1
    gen = torch.Generator().manual_seed(0)

    def step():
        target = method(x, None, phase, nets, grid, gen)
        optimisation_step(target, student, opt, 1e-4, 1.0, "mean", emas)

    for _ in range(2):
        step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    dt = (time.perf_counter() - t0) / steps
    queue.put(dict(scale=scale, method=method_name, batch=batch, threads=threads, ms_per_step=1000 * dt,
                   samples_per_s=batch / dt, peak_rss_MiB=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                   parameters=sum(p.numel() for p in net.parameters())))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--digits-batch", type=int, default=128)
    parser.add_argument("--cifar-batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1, help="torch threads for the digits cases")
    parser.add_argument("--cifar-threads", type=int, default=2)
    parser.add_argument("--only", choices=["digits", "cifar10"])
    args = parser.parse_args()
    cases = []
    if args.only in (None, "digits"):
        cases += [("digits", m, args.digits_batch, args.steps, args.threads) for m in METHODS]
    if args.only in (None, "cifar10"):
        cases += [("cifar10", m, args.cifar_batch, max(2, args.steps // 3), args.cifar_threads) for m in ("teacher", "tract")]
    ctx = mp.get_context("spawn")
    rows = []
    for scale, method, batch, steps, threads in cases:
        queue = ctx.Queue()
        proc = ctx.Process(target=measure, args=(scale, method, batch, steps, threads, queue))
        proc.start()
        rows.append(queue.get())
        proc.join()
        print(f"{scale} {method}: {rows[-1]['samples_per_s']:.1f} samples/s", flush=True)
    print(tabulate(rows, headers="keys", floatfmt=".1f", tablefmt="github"))


if __name__ == "__main__":
    main()
