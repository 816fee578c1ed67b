"""The encoding stage: a source's images (and captions) through a model folder's encoders, once, into shards.

Everything is checked and the manifest built before anything is written: the model folder, the source,
the output folder (empty, new, or holding this very encoding, which is then resumed).  Shards are encoded
one at a time, each in batches that start at its first sample, and written atomically; an interrupted run
continues after its last complete shard and ends with the same bytes as an uninterrupted one (layout in
:mod:`tract_repro.data.latent_store`).
"""
import contextlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from tract_repro.common.errors import ConfigError
from tract_repro.data import latent_store as store
from tract_repro.data.latent_models import POSTERIORS, Encoders, check_model_folder, component_digests
from tract_repro.data.latent_sources import open_source

LATENT_DTYPES = ("float32", "float16")
TEXT_DTYPE = "float16"


def _check_options(posterior, seed, batch, shard_size, latent_dtype, resolution):
    if posterior not in POSTERIORS:
        raise ConfigError(f"--posterior must be one of {', '.join(POSTERIORS)}, not {posterior!r}")
    if seed < 0:
        raise ConfigError(f"--seed must be a whole number ≥ 0, not {seed}")
    for name, value in (("--batch", batch), ("--shard-size", shard_size)) + \
            ((("--resolution", resolution),) if resolution is not None else ()):
        if value < 1:
            raise ConfigError(f"{name} must be a positive whole number, not {value}")
    if latent_dtype not in LATENT_DTYPES:
        raise ConfigError(f"--latent-dtype must be one of {', '.join(LATENT_DTYPES)}, not {latent_dtype!r}")


def _conditioning(encoders, source, num_classes):
    """('text' | 'class' | 'none', number of classes) of the encoding, with the source checked for it."""
    if encoders.has_text:
        if num_classes is not None:
            raise ConfigError(f"--num-classes is for class-conditional models; {encoders.model} is text-conditioned")
        source.require_captions(f"{encoders.model} (a text-conditioned model) needs")
        return "text", 1
    if not source.has_labels:
        if num_classes is not None:
            raise ConfigError(f"--num-classes {num_classes} given but {source.spec} has no labels")
        return "none", 1
    classes = source.max_label + 1 if num_classes is None else int(num_classes)
    if source.max_label >= classes:
        raise ConfigError(f"{source.spec} has label {source.max_label} but --num-classes is {classes}")
    return "class", classes


def build_manifest(encoders, source, model_spec, resolution, posterior, seed, shard_size, latent_dtype, num_classes):
    """The manifest of this encoding (no file written): what a resume must match exactly."""
    conditioning, classes = _conditioning(encoders, source, num_classes)
    channels = int(encoders.vae.config.in_channels)
    if source.channels != channels:
        raise ConfigError(f"{source.spec} has {source.channels}-channel images but the VAE of {encoders.model} takes "
                          f"{channels} channels: encode it with a VAE made for such images")
    text = None
    if encoders.has_text:
        config = encoders.text_encoder.config
        text = {"length": int(encoders.tokenizer.model_max_length), "width": int(config.hidden_size),
                "dtype": TEXT_DTYPE}
    return {
        "format": store.FORMAT,
        "model": str(model_spec),
        "files_sha256": component_digests(encoders.model, encoders.has_text),
        "scaling_factor": encoders.scaling_factor,
        "shift_factor": encoders.shift_factor,
        "posterior": posterior,
        "seed": int(seed) if posterior == "sample" else None,  # the mean does not depend on it
        "resolution": int(resolution),
        "latent_shape": encoders.latent_shape(resolution),
        "latent_dtype": latent_dtype,
        "count": len(source),
        "shard_size": int(shard_size),
        "conditioning": conditioning,
        "num_classes": classes,
        "text": text,
        "device": encoders.device.type,
        "source": source.identity(),
        "preprocess": source.preprocess,
    }


def _take(items, n):
    out = []
    for item in items:
        out.append(item)
        if len(out) == n:
            break
    if len(out) != n:
        raise ConfigError(f"the source ended after fewer samples than it listed ({len(out)} of {n} more); "
                          "encode again into a new --out")
    return out


def _encode_shard(encoders, source, manifest, items, first, stop, batch, pool):
    """{kind: array} of samples [first, stop), encoded in batches [first + j·B, …)."""
    n, resolution = stop - first, manifest["resolution"]
    arrays = {"latents": np.empty((n, *manifest["latent_shape"]), dtype=manifest["latent_dtype"]),
              "labels": np.zeros(n, dtype=np.int64)}
    if manifest["text"]:
        arrays["text"] = np.empty((n, manifest["text"]["length"], manifest["text"]["width"]), dtype=TEXT_DTYPE)
    for lo in range(0, n, batch):
        chunk = _take(items, min(batch, n - lo))
        decode = lambda item: source.pixels(item, resolution)  # noqa: E731
        x = np.stack(list(pool.map(decode, chunk) if pool else map(decode, chunk)))
        z = encoders.latents(x, range(first + lo, first + lo + len(chunk)), manifest["posterior"], manifest["seed"])
        if list(z.shape[1:]) != manifest["latent_shape"]:
            raise ConfigError(f"the VAE gave latents {list(z.shape[1:])}, not {manifest['latent_shape']}; "
                              "check the model folder's vae/config.json")
        arrays["latents"][lo:lo + len(chunk)] = z.numpy().astype(manifest["latent_dtype"])
        arrays["labels"][lo:lo + len(chunk)] = [item.label or 0 for item in chunk]
        if manifest["text"]:
            arrays["text"][lo:lo + len(chunk)] = encoders.text([item.caption for item in chunk]).numpy()
    return arrays


def encode(model, source, out, resolution=None, posterior="mean", seed=0, batch=32, shard_size=1024,
           latent_dtype="float32", device="cpu", num_classes=None, workers=1, on_shard=None, progress=True):
    """Encode ``source`` with ``model``'s encoders into ``out``; returns the manifest.

    ``resolution`` defaults to the source's own (``digits:R``), else the VAE's ``sample_size``; ``on_shard(k)`` is called after shard k is
    written (tests interrupt a run there); ``workers`` threads decode images.
    """
    from tqdm import tqdm

    _check_options(posterior, seed, batch, shard_size, latent_dtype, resolution)
    check_model_folder(model)
    src = open_source(source)  # the source's faults before the (slower) model loading
    encoders = Encoders(model, device)
    resolution = int(resolution or src.resolution or encoders.vae.config.sample_size)
    if src.resolution is not None and resolution != src.resolution:
        raise ConfigError(f"{src.spec} is {src.resolution}×{src.resolution}: drop --resolution {resolution} or name "
                          f"the source digits:{resolution}")
    manifest = build_manifest(encoders, src, model, resolution, posterior, seed, shard_size, latent_dtype,
                              num_classes)
    out = Path(out)
    done = store.check_out_dir(out, manifest)
    if out.is_dir():
        store.remove_partial_files(out)  # a killed run's torn temporary file
    total = store.num_shards(manifest["count"], shard_size)
    store.write_manifest(out, manifest)
    if encoders.has_text:
        store.save_array(out / store.NULL_TEXT, encoders.text([""])[0].numpy().astype(TEXT_DTYPE))
    start = store.shard_rows(manifest, done)[0] if done < total else manifest["count"]
    items = src.items(start)
    bar = tqdm(total=manifest["count"], initial=start, unit="img", desc=f"encode {out.name}", disable=not progress,
               dynamic_ncols=True)
    with bar, ThreadPoolExecutor(workers) if workers > 1 else contextlib.nullcontext() as pool:
        for k in range(done, total):
            first, stop = store.shard_rows(manifest, k)
            arrays = _encode_shard(encoders, src, manifest, items, first, stop, batch, pool)
            for kind in store.KINDS:  # latents last: its file marks the shard complete
                if kind in arrays:
                    store.save_array(out / store.shard_file(kind, k), arrays[kind])
            bar.update(stop - first)
            if on_shard is not None:
                on_shard(k)
    return manifest
