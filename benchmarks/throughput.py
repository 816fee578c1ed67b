"""Training throughput (samples/s) and peak memory of the training loop's teacher, BTD and TRACT steps, on the CPU.

    python benchmarks/throughput.py                    # digits (batch 128, 1 thread) + CIFAR-10 config (batch 8)
    python benchmarks/throughput.py --only cifar10 --cifar-batch 16 --cifar-threads 2

Each case runs in a fresh process (so its peak memory is its own), builds the loop's ``Run`` from
its run file in gin/ and times its real steps after warm-up (``Run.step`` + ``Run.after_step``,
as ``Run.steps`` runs them: data, targets, student step, Adam, EMA updates, metrics; see
``benchmarks/run_step.py`` for what the benchmark turns off), and prints one row.  Teachers and
CIFAR-10 images are random: speed doesn't depend on the weights or the pixels.
``benchmarks/run_step.py`` also times the step's network passes alone (the per-step overhead).
"""
import argparse
import multiprocessing as mp

from tabulate import tabulate

import run_step

METHODS = ("teacher", "btd", "tract")


def measure(scale, method_name, batch, steps, threads, queue):
    row = run_step.measure_case(f"{scale}_{method_name}", batch, threads, "cpu", steps=steps, repeats=1, warmup=2,
                                passes=False, flops=False)
    queue.put(dict(scale=scale, method=method_name, batch=batch, threads=threads, ms_per_step=row["ms_per_step"],
                   samples_per_s=row["samples_per_s"], peak_rss_MiB=row["peak_GiB"] * 1024,
                   parameters=row["parameters"]))


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
        proc.join()  # the row is small: the child exits once it has queued it
        if proc.exitcode:
            raise SystemExit(f"{scale} {method}: the measuring process failed (exit code {proc.exitcode})")
        rows.append(queue.get())
        print(f"{scale} {method}: {rows[-1]['samples_per_s']:.1f} samples/s", flush=True)
    print(tabulate(rows, headers="keys", floatfmt=".1f", tablefmt="github"))


if __name__ == "__main__":
    main()
