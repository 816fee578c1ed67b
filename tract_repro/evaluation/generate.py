"""Samples from a run's weights with one seed per sample (as EDM), so results don't depend on batching."""
import functools
import json
import os
from pathlib import Path

import torch
from tqdm import tqdm

from tract_repro.methods.heun import heun_sampler
from tract_repro.sampling.samplers import noise_from_seeds, sample_grid_steps
from tract_repro.training.checkpoint import load, save_atomic, sha256


def labels_from_seeds(seeds, num_classes):
    """One class per seed, drawn after the seed's noise stream (EDM's convention), for conditional nets."""
    return torch.tensor([int(torch.randint(num_classes, (1,), generator=torch.Generator().manual_seed(int(s) + 2**31)))
                         for s in seeds])


@torch.no_grad()
def generate_batches(denoiser, grid, steps, seeds, shape, num_classes=1, batch_size=500, desc=None, sampler="ddim",
                     device=None):
    """Yield x₀ samples (B, *shape) in [−1, 1] batch by batch, seed i → sample i (see :func:`generate`).

    ``device``: where the denoiser and ``grid`` live; noise and labels are drawn on the CPU per seed and moved
    there, and each batch comes back on the CPU.
    """
    seeds = list(seeds)
    for i in tqdm(range(0, len(seeds), batch_size), desc=desc or f"{sampler} {steps} steps", leave=False, disable=None):
        chunk = seeds[i:i + batch_size]
        labels = labels_from_seeds(chunk, num_classes) if num_classes > 1 else None
        noise = noise_from_seeds(chunk, shape)
        if device is not None:
            noise = noise.to(device)
            labels = None if labels is None else labels.to(device)
        if sampler == "heun":
            logsnrs = grid.schedule.grid(steps).flip(0)
            logsnrs = logsnrs if device is None else logsnrs.to(device)
            _, sigma_max = grid.alpha_sigma(logsnrs[:1])
            x = heun_sampler(denoiser, sigma_max * noise, logsnrs, grid.alpha_sigma, labels)
        elif sampler == "ddim":
            x = sample_grid_steps(denoiser, grid, steps, noise, labels)
        else:
            raise ValueError(f"unknown sampler {sampler!r}: choose 'ddim' or 'heun'")
        x = x.clamp(-1, 1)
        yield x if device is None else x.cpu()


def generate(denoiser, grid, steps, seeds, shape, num_classes=1, batch_size=500, desc=None, sampler="ddim", workers=1):
    """x₀ samples (N, *shape) in [−1, 1], seed i → sample i.

    ``ddim``: K = ``steps`` clipped DDIM steps on the training grid (K must divide T).
    ``heun``: EDM's deterministic Heun sampler on the schedule's own K-step grid (2K − 1 network calls).
    ``workers`` > 1: that many one-thread processes forked from this one (which has run no parallel
    torch operation), each sampling a contiguous share of the seeds; the same samples, sooner.
    """
    seeds = list(seeds)
    if workers <= 1 or len(seeds) < 2:
        return torch.cat(list(generate_batches(denoiser, grid, steps, seeds, shape, num_classes, batch_size, desc, sampler)))
    one_process = functools.partial(generate, denoiser, grid, steps, shape=shape, num_classes=num_classes,
                                    batch_size=batch_size, desc=desc, sampler=sampler)
    return _forked(one_process, _shares(seeds, workers))


def _shares(seeds, workers):
    """``seeds`` in ``workers`` contiguous runs, as even as can be."""
    bounds = [len(seeds) * i // workers for i in range(workers + 1)]
    return [seeds[a:b] for a, b in zip(bounds, bounds[1:]) if b > a]


def _forked(sample, shares):
    """Run ``sample(seeds=share)`` for each share in a forked one-thread process; concatenate in order."""
    import multiprocessing
    import numpy as np

    context = multiprocessing.get_context("fork")

    def work(share, conn):
        torch.set_num_threads(1)
        try:
            x = sample(seeds=share)
            conn.send(("ok", x.numpy()))
        except BaseException as exc:  # noqa: B036 -- reported to the parent, which raises it
            conn.send(("error", f"{type(exc).__name__}: {exc}"))
        finally:
            conn.close()
            os._exit(0)

    jobs = []
    for share in shares:
        receive, send = context.Pipe(duplex=False)
        process = context.Process(target=work, args=(share, send), daemon=True)
        process.start()
        send.close()
        jobs.append((process, receive))
    parts = []
    for process, receive in jobs:
        try:
            status, value = receive.recv()
        except EOFError:
            status, value = "error", f"a sampling worker died (exit {process.join() or process.exitcode})"
        process.join()
        if status != "ok":
            for other, _ in jobs:
                other.kill()
            raise RuntimeError(f"sampling worker failed: {value}")
        parts.append(torch.from_numpy(np.asarray(value)))
    return torch.cat(parts)


def network_calls(sampler, steps):
    """NFE of a K-step sampler: K for DDIM, 2K − 1 for Heun (Euler on the last step)."""
    return 2 * steps - 1 if sampler == "heun" else steps


def teacher_reference(teacher, weights_file, grid, steps, seeds, shape, cache_dir, num_classes=1, batch_size=500,
                      workers=1):
    """The teacher's ``steps``-step DDIM output for ``seeds``, computed once and cached by weights digest."""
    seeds = list(seeds)
    key = f"{sha256(weights_file)[:16]}_ddim{steps}_seeds{seeds[0]}-{seeds[-1]}_n{len(seeds)}"
    path = Path(cache_dir) / f"reference_{key}.pt"
    if path.is_file():
        return load(path)["samples"]
    samples = generate(teacher, grid, steps, seeds, shape, num_classes, batch_size, desc=f"teacher reference {steps} steps",
                       workers=workers)
    save_atomic({"samples": samples}, path)
    path.with_suffix(".json").write_text(json.dumps(dict(weights=str(weights_file), steps=steps, seeds=[seeds[0], seeds[-1]],
                                                          n=len(seeds)), indent=2) + "\n")
    return samples


def rmse(a, b):
    """√mean((a − b)²) over every pixel of every sample."""
    return (a.double() - b.double()).square().mean().sqrt().item()
