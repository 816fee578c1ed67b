"""Sample dumps for external evaluators: ``python -m tract_repro.evaluation.fid sample RUN --steps K --samples N --out FILE.npz``.

The ``.npz`` holds ``arr_0``, the samples as uint8 NHWC (quantised as ``--protocol`` does: ``tract`` and
``clean`` round(127.5·(x + 1)), ``edm`` ⌊127.5·x + 128⌋), ``arr_1``, their class labels (class-conditional runs), and ``seeds``: the layout of the ADM
evaluator's sample batches (``arr_0``), which EDM's ``fid.py`` and clean-fid read as well once the
images are written out; ``--png DIR`` writes one PNG per sample, ``<seed>.png``, the folder EDM's
``fid.py calc --images`` and clean-fid's ``compute_fid(folder, …)`` take.  Sample i comes from seed
``first_seed + i`` exactly as in every evaluation here (noise, label and, for the stochastic sampler,
its re-noising draws from that seed alone).  A latent run's samples are decoded by its data set's VAE; a
text-to-image run samples caption s mod N of ``--prompts`` (an encoded caption set) for seed s, and the
``.npz`` keeps those captions (``captions``).
"""
import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from tract_repro.common.errors import ConfigError
from tract_repro.common.files import write_atomic


def check_outputs(out, png):
    """One line, before any work, if an output would overwrite something or cannot be an ``.npz``."""
    out = Path(out)
    if out.suffix != ".npz":
        raise ConfigError(f"--out {out}: give a .npz file, e.g. samples.npz")
    if out.exists():
        raise ConfigError(f"--out {out} exists: remove it or choose another file (nothing is overwritten)")
    if png is not None and Path(png).exists() and any(Path(png).iterdir()):
        raise ConfigError(f"--png {png} is not empty: choose a new folder (nothing is overwritten)")


def dump_samples(run_dir, steps, samples, out, first_seed=0, sampler="ddim", w=None, png=None, batch_size=500,
                 device="cpu", protocol="tract", prompts=None):
    """Write ``samples`` K-step samples of a finished run (its inference EMA) to ``out`` (and PNGs to ``png``)."""
    from tract_repro.evaluation.generate import generate_batches, labels_from_seeds
    from tract_repro.evaluation.metrics import conditioned
    from tract_repro.evaluation.prompts import for_run
    from tract_repro.evaluation.runs import load_run, sample_shape
    from tract_repro.sampling import registry
    from tract_repro.evaluation.protocols import get as get_protocol

    if samples < 1 or steps < 1 or first_seed < 0:
        raise ConfigError(f"--samples {samples} --steps {steps} --first-seed {first_seed}: give at least one sample and "
                          f"one step, and a first seed of at least 0")
    quantise = get_protocol(protocol).quantise
    check_outputs(out, png)
    run = load_run(run_dir, with_data="encoded")
    registry.get(sampler).logsnrs(run.grid, steps)  # the sampler exists and takes K steps on this grid (one line)
    denoiser, extra, _ = conditioned(run, w)
    shape = sample_shape(run)
    decode = run.data.decode if getattr(run.data, "encoded", False) else None
    prompt_set = for_run(run, prompts)
    classes = run.denoiser.net.num_classes if run.denoiser.conditional else 1
    device = torch.device(device)
    denoiser.to(device)
    seeds = range(first_seed, first_seed + samples)
    images = torch.cat([quantise(x) for x in generate_batches(denoiser, run.grid.to(device), steps, seeds, shape, classes,
                                                               batch_size, desc=f"{run.path.name} {steps} steps",
                                                               sampler=sampler, device=device, extra=extra,
                                                               decode=decode, clip=run.bounded, prompts=prompt_set)])
    nhwc = images.permute(0, 2, 3, 1).numpy()
    arrays = dict(arr_0=nhwc, seeds=np.arange(first_seed, first_seed + samples))
    if classes > 1:
        arrays["arr_1"] = labels_from_seeds(seeds, classes).numpy()
    if prompt_set is not None:
        arrays["captions"] = np.array(prompt_set.captions(seeds), dtype=str)
    if png is not None:
        folder = Path(png)
        folder.mkdir(parents=True, exist_ok=True)
        for seed, image in zip(seeds, nhwc):
            picture = Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image)
            write_atomic(folder / f"{seed:06d}.png", lambda f, p=picture: p.save(f, format="PNG"))
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    write_atomic(out, lambda f: f.write(buffer.getvalue()))
    return arrays

