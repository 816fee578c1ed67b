"""Samples from a run's weights with one seed per sample (as EDM), so results don't depend on batching.

A run on an encoded data set (latents) samples latents, with x̂ unclipped (``clip = False``: ``FinishedRun.bounded``);
``decode`` (the data set's own, ``data.decode``) turns each batch into images before it is clipped to [−1, 1], so
everything downstream sees images either way.
"""
import functools
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
from tqdm import tqdm

from tract_repro.networks.conditioning import Cond
from tract_repro.sampling import registry
from tract_repro.sampling.samplers import noise_from_seeds
from tract_repro.common.files import sha256, write_json
from tract_repro.training.checkpoint import UnreadableCheckpoint, load, save_atomic


def labels_from_seeds(seeds, num_classes):
    """One class per seed, drawn after the seed's noise stream (EDM's convention), for conditional nets."""
    return torch.tensor([int(torch.randint(num_classes, (1,), generator=torch.Generator().manual_seed(int(s) + 2**31)))
                         for s in seeds])


@torch.no_grad()
def generate_batches(denoiser, grid, steps, seeds, shape, num_classes=1, batch_size=500, desc=None, sampler="ddim",
                     device=None, extra=None, decode=None, clip=True, prompts=None):
    """Yield x₀ samples (B, *shape) in [−1, 1] batch by batch, seed i → sample i (see :func:`generate`).

    ``device``: where the denoiser and ``grid`` live; noise and labels are drawn on the CPU per seed and moved
    there, and each batch comes back on the CPU.  ``extra``: {name: value} inputs every sample gets (guidance's w).
    ``decode``: latents → images, applied to each batch before the clip (None: the samples are images).
    ``clip``: whether the sampler clips x̂ to [−1, 1] (False for unbounded data, latents).
    ``prompts``: seeds → :class:`Cond` (a text-to-image run's captions, :class:`~tract_repro.evaluation.prompts.Prompts`),
    instead of a class label per seed.
    """
    seeds = list(seeds)
    for i in tqdm(range(0, len(seeds), batch_size), desc=desc or f"{sampler} {steps} steps", leave=False, disable=None):
        chunk = seeds[i:i + batch_size]
        base = prompts.cond(chunk) if prompts is not None else \
            Cond(labels_from_seeds(chunk, num_classes) if num_classes > 1 else None)
        cond = Cond(base.labels, {**base.extra, **{k: torch.full((len(chunk),), float(v), dtype=torch.float64)
                                                   for k, v in (extra or {}).items()}})
        noise = noise_from_seeds(chunk, shape)
        if device is not None:
            noise, cond = noise.to(device), cond.to(device)
        x = registry.sample(sampler, denoiser, grid, steps, noise, cond, seeds=chunk, clip=clip)
        if decode is not None:
            x = decode(x)
        x = x.clamp(-1, 1)
        yield x if device is None else x.cpu()


def generate(denoiser, grid, steps, seeds, shape, num_classes=1, batch_size=500, desc=None, sampler="ddim", workers=1,
             extra=None, decode=None, clip=True):
    """x₀ samples (N, *shape) in [−1, 1], seed i → sample i (images: ``decode``'s output shape where it is given).

    ``ddim``: K = ``steps`` clipped DDIM steps on the training grid (K must divide T).
    ``heun``: EDM's deterministic Heun sampler on the schedule's own K-step grid (2K − 1 network calls).
    ``workers`` > 1: that many one-thread processes forked from this one (which has run no parallel
    torch operation), each sampling a contiguous share of the seeds; the same samples, sooner.
    """
    seeds = list(seeds)
    if workers <= 1 or len(seeds) < 2:
        return torch.cat(list(generate_batches(denoiser, grid, steps, seeds, shape, num_classes, batch_size, desc, sampler,
                                               extra=extra, decode=decode, clip=clip)))
    one_process = functools.partial(generate, denoiser, grid, steps, shape=shape, num_classes=num_classes,
                                    batch_size=batch_size, desc=desc, sampler=sampler, extra=extra, decode=decode,
                                    clip=clip)
    return _forked(one_process, _shares(seeds, workers))


def _shares(seeds, workers):
    """``seeds`` in ``workers`` contiguous runs, as even as can be."""
    bounds = [len(seeds) * i // workers for i in range(workers + 1)]
    return [seeds[a:b] for a, b in zip(bounds, bounds[1:]) if b > a]


_worker_sample = None  # in a sampling worker: the partial of generate() it runs on its shares of seeds


def _start_worker(sample):
    global _worker_sample
    torch.set_num_threads(1)
    _worker_sample = sample


def _sample_share(seeds):
    return _worker_sample(seeds=seeds).numpy()


def _forked(sample, shares):
    """Run ``sample(seeds=share)`` for each share in a forked one-thread process; concatenate in order.

    The workers inherit ``sample`` (the denoiser included) through fork, not through a pickle; a
    worker's exception is raised here, as the worker raised it.
    """
    context = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(len(shares), mp_context=context, initializer=_start_worker, initargs=(sample,)) as pool:
        parts = list(pool.map(_sample_share, shares))
    return torch.cat([torch.from_numpy(part) for part in parts])


def teacher_reference(teacher, weights_file, grid, steps, seeds, shape, cache_dir, num_classes=1, batch_size=500,
                      workers=1, extra=None, decode=None, decoder=None, clip=True):
    """The teacher's ``steps``-step DDIM output for ``seeds`` (at the inputs ``extra``, e.g. a guidance weight),
    computed once and cached by weights digest.  ``decode``: latents → images (its ``decoder`` digest, which the
    cache key includes: a reference decoded by another VAE is another reference); ``clip``: as for
    :func:`generate` (an unclipped reference is keyed apart)."""
    seeds = list(seeds)
    inputs = "".join(f"_{k}{v:g}" for k, v in sorted((extra or {}).items()))
    decoded = (f"_dec{decoder[:12]}" if decode is not None and decoder else "") + ("" if clip else "_unclipped")
    key = f"{sha256(weights_file)[:16]}_ddim{steps}{inputs}{decoded}_seeds{seeds[0]}-{seeds[-1]}_n{len(seeds)}"
    path = Path(cache_dir) / f"reference_{key}.pt"
    if path.is_file():
        try:
            return load(path)["samples"]
        except UnreadableCheckpoint as exc:  # a cache: computed again
            print(f"warning: {exc}; computing the teacher reference again", flush=True)
    samples = generate(teacher, grid, steps, seeds, shape, num_classes, batch_size, desc=f"teacher reference {steps} steps",
                       workers=workers, extra=extra, decode=decode, clip=clip)
    save_atomic({"samples": samples}, path)
    write_json(path.with_suffix(".json"), dict(weights=str(weights_file), steps=steps, seeds=[seeds[0], seeds[-1]], n=len(seeds)))
    return samples


def rmse(a, b):
    """√mean((a − b)²) over every pixel of every sample."""
    return (a.double() - b.double()).square().mean().sqrt().item()
