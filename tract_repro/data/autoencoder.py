"""The latent digits' autoencoder: a small diffusers ``AutoencoderKL`` trained on the 32×32 digits, saved as a
diffusers folder that ``python -m tract_repro.encode_latents --model DIR`` reads.

**Loss** (LDM's KL-regularised autoencoder, Rombach et al. 2022, §3 and App. G: "a slight KL-penalty towards a
standard normal on the learned latent, similar to a VAE"; their ``ldm/modules/losses/contperceptual.py`` sums each
term over a sample and averages over the batch, and their ``configs/autoencoder/autoencoder_kl_*.yaml`` set
``kl_weight: 0.000001``), without LDM's perceptual and adversarial terms (no LPIPS network offline):

    L = (1/B)·Σ_b Σ_pixels |x_b − D(z_b)|  +  β·(1/B)·Σ_b KL(q(z|x_b) ‖ N(0, I)),   z_b ~ q(z|x_b),  β = 1e-6,

with q(z|x) = N(μ(x), σ²(x)) the encoder's diagonal Gaussian (diffusers' ``DiagonalGaussianDistribution``), z drawn
from the run's own generator.  ``loss = 'mse'`` puts (x − D(z))² in place of |x − D(z)|.  Adam, its rate
cosine-decayed to 0 over the run (``schedule = 'constant'`` keeps it).  The defaults (3 levels of 16, 32, 32 channels:
32×32×1 → 8×8×4, 450 steps of 64) and why: docs/latent-digits.md.

**Scaling factor**: 1/std of the training latents, as LDM's ``scale_by_std`` sets it (there 1/std of the first
batch's posterior samples); here the std of every element of the posterior means μ(x) of the whole training set
(the latents ``encode_latents`` stores, posterior mean by default), written into the VAE's config, so that
z = μ·scaling_factor has unit variance.

**Files of DIR**: ``vae_settings.json`` (what this run is, written first and never changed: a rerun with other
settings is refused), ``checkpoints/ckpt_<step>.pt`` with a ``.sha256`` beside (model, Adam, the generator and torch's
RNG, the step, which fixes the data position: written atomically, resumed exactly), and at the end ``vae/`` (config
and safetensors, by ``save_pretrained``, renamed into place whole), ``model_index.json`` and ``training.json`` (the
record; its presence marks the training complete).
"""
import hashlib
import json
import math
import shutil
import time
from pathlib import Path

import gin
import torch

from tract_repro.common.errors import ConfigError
from tract_repro.common.files import atomic_folder, sha256, write_atomic, write_json
from tract_repro.data.arrays import EpochOrder
from tract_repro.data.digits import digits_upsampled
from tract_repro.data.latent_store import first_difference

SETTINGS = "vae_settings.json"
RECORD = "training.json"
FORMAT = "tract-vae-1"
LOSSES = ("l1", "mse")
SCHEDULES = ("constant", "cosine")
CHECKSUM = ".sha256"


@gin.configurable
def vae_architecture(block_out_channels=(16, 32, 32), layers_per_block=1, latent_channels=4, norm_num_groups=8,
                     mid_block_attention=True):
    """The ``AutoencoderKL`` config's sizes: one down (and up) block per entry of ``block_out_channels`` (3 levels:
    32×32 → 8×8 latents), ``latent_channels`` latent channels; the image channels and ``sample_size`` come from the
    data."""
    return dict(block_out_channels=[int(c) for c in block_out_channels], layers_per_block=int(layers_per_block),
                latent_channels=int(latent_channels), norm_num_groups=int(norm_num_groups),
                mid_block_add_attention=bool(mid_block_attention))


def vae_config(data, architecture):
    """The full ``AutoencoderKL`` config of ``architecture`` on ``data``'s images (C, R, R)."""
    channels, side, _ = data.shape
    levels = len(architecture["block_out_channels"])
    if side % 2 ** (levels - 1):
        raise ConfigError(f"{levels} levels downsample by {2 ** (levels - 1)}, which does not divide the images' side "
                          f"{side}: change vae_architecture.block_out_channels")
    if any(c % architecture["norm_num_groups"] for c in architecture["block_out_channels"]):
        raise ConfigError(f"vae_architecture.norm_num_groups = {architecture['norm_num_groups']} does not divide every "
                          f"entry of block_out_channels {architecture['block_out_channels']}")
    return dict(in_channels=channels, out_channels=channels, down_block_types=["DownEncoderBlock2D"] * levels,
                up_block_types=["UpDecoderBlock2D"] * levels, sample_size=side, **architecture)


def data_digest(data):
    """sha256 of a data set's images and labels: which images a run trained on."""
    h = hashlib.sha256(data.images.contiguous().numpy().tobytes())
    h.update(data.labels.contiguous().numpy().astype("int64").tobytes())
    return h.hexdigest()


def latent_shape(config):
    side = config["sample_size"] // 2 ** (len(config["block_out_channels"]) - 1)
    return [config["latent_channels"], side, side]


def _save(obj, path):
    """torch.save atomically, with its sha256 beside it (``sha256sum -c`` format)."""
    path = write_atomic(path, lambda f: torch.save(obj, f), durable=True)
    write_atomic(path.with_name(path.name + CHECKSUM), lambda f: f.write(f"{sha256(path)}  {path.name}\n"), mode="w",
                 durable=True)


def _load(path):
    """A checkpoint, after its sha256 matched, without unpickling code (weights_only)."""
    record = path.with_name(path.name + CHECKSUM)
    if record.is_file() and record.read_text().split()[:1] != [sha256(path)]:
        raise ConfigError(f"{path} does not match its sha256 ({record.name}): remove it (and {record.name}) to resume "
                          "from the checkpoint before it")
    return torch.load(path, map_location="cpu", weights_only=True)


def _checkpoints(out):
    folder = Path(out) / "checkpoints"
    return sorted(folder.glob("ckpt_*.pt")) if folder.is_dir() else []


def check_out(out, settings):
    """'new' (a missing or empty folder), 'resume' (this run, unfinished) or 'done' (this run, trained); a one-line
    refusal of anything else, before anything is written."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file: choose a folder")
    if not out.exists() or not any(out.iterdir()):
        return "new"
    path = out / SETTINGS
    if not path.is_file():
        raise ConfigError(f"{out} holds files but no {SETTINGS} (not a VAE run): choose an empty or new --out folder")
    try:
        old = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path} is not JSON ({exc}): choose another --out or remove {out}") from None
    diff = first_difference(old, json.loads(json.dumps(settings)))
    if diff:
        field, was, now = diff
        raise ConfigError(f"{out} holds a different VAE run ({field or 'settings'}: {json.dumps(was)[:60]} there, "
                          f"{json.dumps(now)[:60]} now): choose another --out or remove {out}")
    return "done" if (out / RECORD).is_file() else "resume"


def _rate(lr, schedule, step, steps):
    if schedule == "cosine":
        return lr * 0.5 * (1 + math.cos(math.pi * step / steps))
    return lr


@torch.no_grad()
def posterior_means(vae, images, batch=256):
    """μ(x) of images (N, C, R, R) in float32, ``batch`` at a time: (N, C_latent, h, w)."""
    return torch.cat([vae.encode(images[i:i + batch].float()).latent_dist.mean for i in range(0, len(images), batch)])


def _scaling_factor(vae, images):
    """1 / std of every element of the training set's posterior means (unbiased std, over all N·C·h·w values)."""
    return float(1.0 / posterior_means(vae, images).flatten().std())


@gin.configurable(denylist=["out", "on_step", "progress"])
def train_vae(out, data=digits_upsampled, architecture=vae_architecture, steps=450, batch_size=64, lr=1e-3,
              schedule="cosine", beta=1e-6, loss="l1", seed=0, checkpoint_every=150, log_every=25, threads=1,
              on_step=None, progress=True):
    """Train the autoencoder into ``out`` (resuming exactly from its newest checkpoint) and write the diffusers folder;
    returns (the record written to ``out/training.json``, the pixel data set it trained on).  A finished run is not
    trained again: its record is returned.

    ``data``: a callable giving the pixel data set (ImageArrays, default the 32×32 digits); ``architecture``: a
    callable giving :func:`vae_architecture`'s dict.  ``on_step(step)`` is called after each step (and after its
    checkpoint, if one is due); tests interrupt a run there.
    """
    from diffusers import AutoencoderKL
    from tqdm import tqdm

    for name, value in (("steps", steps), ("batch_size", batch_size), ("checkpoint_every", checkpoint_every),
                        ("log_every", log_every), ("threads", threads)):
        if int(value) != value or value < 1:
            raise ConfigError(f"train_vae.{name} must be a positive whole number, not {value}")
    if loss not in LOSSES or schedule not in SCHEDULES:
        raise ConfigError(f"train_vae.loss must be one of {', '.join(LOSSES)} and train_vae.schedule one of "
                          f"{', '.join(SCHEDULES)}, not {loss!r}, {schedule!r}")
    if not lr > 0 or not beta >= 0:
        raise ConfigError(f"train_vae.lr must be > 0 and train_vae.beta ≥ 0, not {lr}, {beta}")
    images = data() if callable(data) else data
    config = vae_config(images, architecture() if callable(architecture) else dict(architecture))
    settings = dict(format=FORMAT, data=dict(name=images.name, count=len(images), shape=list(images.shape),
                                             sha256=data_digest(images)),
                    vae=config, steps=int(steps), batch_size=int(batch_size), lr=float(lr), schedule=schedule,
                    beta=float(beta), loss=loss, seed=int(seed))
    out = Path(out)
    state = check_out(out, settings)
    if state == "done":
        return json.loads((out / RECORD).read_text()), images
    torch.set_num_threads(int(threads))
    torch.manual_seed(seed)
    vae = AutoencoderKL(**config).train()
    optimizer = torch.optim.Adam(vae.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    order = EpochOrder(len(images), seed)
    start, losses, seconds = 0, [], 0.0
    found = _checkpoints(out)
    if found:
        saved = _load(found[-1])
        vae.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        generator.set_state(saved["generator"])
        torch.set_rng_state(saved["torch_rng"])
        start, losses, seconds = int(saved["step"]), list(saved["losses"]), float(saved["seconds"])
    write_json(out / SETTINGS, settings)
    began = time.perf_counter() - seconds
    bar = tqdm(total=steps, initial=start, unit="step", desc=f"vae {out.name}", disable=not progress, dynamic_ncols=True)
    with bar:
        for step in range(start, steps):
            for group in optimizer.param_groups:
                group["lr"] = _rate(lr, schedule, step, steps)
            x = images.batch(order.indices(step * batch_size, batch_size))[0].float()
            posterior = vae.encode(x).latent_dist
            y = vae.decode(posterior.sample(generator=generator)).sample
            error = (y - x).abs() if loss == "l1" else (y - x).square()
            reconstruction = error.sum() / len(x)
            kl = posterior.kl().sum() / len(x)
            total = reconstruction + beta * kl
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            optimizer.step()
            done = step + 1
            if done % log_every == 0 or done == steps:
                losses.append(dict(step=done, loss=total.item(), reconstruction=reconstruction.item(), kl=kl.item()))
                bar.set_postfix(rec=f"{losses[-1]['reconstruction']:.2f}", kl=f"{losses[-1]['kl']:.0f}")
            bar.update(1)
            if done % checkpoint_every == 0 or done == steps:
                _save(dict(step=done, model=vae.state_dict(), optimizer=optimizer.state_dict(),
                           generator=generator.get_state(), torch_rng=torch.get_rng_state(), losses=losses,
                           seconds=time.perf_counter() - began), out / "checkpoints" / f"ckpt_{done:08d}.pt")
                for old in _checkpoints(out)[:-1]:
                    old.unlink()
                    old.with_name(old.name + CHECKSUM).unlink(missing_ok=True)
            if on_step is not None:
                on_step(done)
    # (a run whose final checkpoint was written but not its folder comes straight here, the weights restored)
    return _finish(vae.eval(), out, images, settings, losses, time.perf_counter() - began), images


def _finish(vae, out, images, settings, losses, seconds):
    """The diffusers folder: the scaling factor measured and written into the VAE's config, ``vae/`` by
    ``save_pretrained`` (safetensors) renamed into place whole, ``model_index.json``, then ``training.json``."""
    import diffusers

    scaling = _scaling_factor(vae, images.images)
    vae.register_to_config(scaling_factor=scaling)
    if (out / "vae").exists():  # a finish of this run cut short: its vae/ is written again
        shutil.rmtree(out / "vae")
    with atomic_folder(out / "vae") as folder:
        vae.save_pretrained(folder, safe_serialization=True)
    write_json(out / "model_index.json", {"_class_name": "DiffusionPipeline", "_diffusers_version": diffusers.__version__,
                                          "vae": ["diffusers", "AutoencoderKL"]})
    record = dict(settings=settings, scaling_factor=scaling, latent_shape=latent_shape(settings["vae"]),
                  parameters=sum(p.numel() for p in vae.parameters()), seconds=seconds,
                  final=losses[-1] if losses else None, losses=losses,
                  weights_sha256=sha256(out / "vae" / "diffusion_pytorch_model.safetensors"))
    write_json(out / RECORD, record)
    return record


@torch.no_grad()
def reconstruct(folder, images, batch=256):
    """decode(encode(x)) of images (N, C, R, R) through ``folder``'s VAE by the path the latent data takes: z = μ(x)·s
    stored in float32 (what ``encode_latents`` writes with the posterior mean), then D(z / s) (what
    ``LatentArrays.decode`` computes): (N, C, R, R) float32, unclipped."""
    from tract_repro.data.latent_models import decode_latents, load_vae

    vae = load_vae(folder)
    scaling = float(vae.config.scaling_factor)
    z = (posterior_means(vae, images, batch) * scaling).float()
    return decode_latents(vae, z, scaling, None, batch)
