"""A diffusers model folder's own encoders: its ``AutoencoderKL`` (``vae/``) and, for Stable Diffusion, its
CLIP text encoder (``text_encoder/`` with ``tokenizer/``).

* Latents: z = (μ − shift) · scaling_factor with μ the posterior mean of E(x), or z = (μ + σ·ε_i − shift) ·
  scaling_factor with ε_i ~ N(0, I) drawn for sample i alone (a generator seeded by (seed, i)), so a sample's
  latent does not depend on the batch it is encoded in; shift is ``vae.config.shift_factor`` (0 when unset,
  as in SD 1/2).
* Images from latents: x = D(z / scaling_factor + shift), D the VAE's decoder (:func:`decode_latents`), the inverse
  of the encoding's scaling as diffusers' pipelines decode.
* Caption embeddings: T(c) = CLIPTextModel(tokenizer(c, padded to max length, truncated)).last_hidden_state,
  (L, D), as Stable Diffusion's pipeline computes its prompt embeddings; ∅ = T("").
"""
import importlib.util
from pathlib import Path

import numpy as np
import torch

from tract_repro.common.errors import ConfigError
from tract_repro.common.files import sha256

POSTERIORS = ("mean", "sample")


def check_model_folder(model):
    """(model Path, has_text): refuses a folder without ``vae/`` or with half of the text components."""
    model = Path(model)
    if not model.is_dir():
        raise ConfigError(f"model folder {model} not found: pass a diffusers model folder (with vae/)")
    if not (model / "vae").is_dir():
        raise ConfigError(f"{model} has no vae/ folder: pass a diffusers model folder whose vae/ holds an "
                          "AutoencoderKL (config.json and safetensors weights)")
    parts = [(model / p).is_dir() for p in ("text_encoder", "tokenizer")]
    if any(parts) and not all(parts):
        have, lack = ("text_encoder", "tokenizer") if parts[0] else ("tokenizer", "text_encoder")
        raise ConfigError(f"{model} has {have}/ but no {lack}/: a text-conditioned folder needs both")
    return model, all(parts)


def _used_files(folder):
    """The files ``from_pretrained(..., use_safetensors=True)`` reads: configs, tokenizer files and the
    safetensors weights without a variant infix (``model.safetensors``, not ``model.fp16.safetensors``)."""
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        if path.suffix == ".safetensors":
            if "." not in path.name[:-len(".safetensors")]:
                yield path
        elif path.suffix in (".json", ".txt", ".model") or folder.name == "tokenizer":
            yield path


def component_digests(model, has_text):
    """{relative path: sha256} of the files of ``vae/`` (and ``text_encoder/``, ``tokenizer/``) that are read."""
    model = Path(model)
    parts = ["vae"] + (["text_encoder", "tokenizer"] if has_text else [])
    return {p.relative_to(model).as_posix(): sha256(p) for part in parts for p in _used_files(model / part)}


def posterior_noise(seed, index, shape):
    """ε_i ~ N(0, I) of sample ``index``: numpy's PCG64 seeded with the entropy (seed, index), float32.

    (torch's CPU generator keeps only the low 32 bits of its seed, so seed · 2³² + i would repeat ε across seeds.)
    """
    return torch.from_numpy(np.random.default_rng([int(seed), int(index)]).standard_normal(shape).astype(np.float32))


def quiet_loading():
    """diffusers and transformers report errors only (no accelerate advice, no weight-loading bars)."""
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def load_vae(folder, device="cpu"):
    """The ``AutoencoderKL`` of ``folder/vae`` (safetensors), float32 on ``device``, in eval mode; one line if it
    does not load."""
    from diffusers import AutoencoderKL

    folder = Path(folder)
    try:
        lazy = importlib.util.find_spec("accelerate") is not None  # diffusers warns when it cannot load lazily
        vae = AutoencoderKL.from_pretrained(folder / "vae", use_safetensors=True, torch_dtype=torch.float32,
                                            low_cpu_mem_usage=lazy)
    except (OSError, ValueError, EnvironmentError) as exc:
        raise ConfigError(f"cannot load {folder / 'vae'} as an AutoencoderKL: "
                          f"{' '.join(str(exc).split())[:300]}") from None
    return vae.to(torch.device(device)).eval().requires_grad_(False)


@torch.no_grad()
def decode_latents(vae, z, scaling_factor, shift_factor=None, batch=256):
    """x = D(z / scaling_factor (+ shift_factor)) of latents z (N, C, h, w), ``batch`` at a time, in float32 on the
    VAE's device: (N, C_image, H, W) float32 on z's device."""
    device = next(vae.parameters()).device
    out = []
    for i in range(0, len(z), batch):
        latent = z[i:i + batch].to(device, torch.float32) / scaling_factor
        if shift_factor is not None:
            latent = latent + shift_factor
        out.append(vae.decode(latent).sample.float().to(z.device))
    return torch.cat(out) if out else z.new_zeros((0,))


class Encoders:
    """The folder's VAE (and text encoder with its tokenizer), in float32 on ``device``, in eval mode."""

    def __init__(self, model, device="cpu"):
        self.model, self.has_text = check_model_folder(model)
        self.device = torch.device(device)
        self.vae = load_vae(self.model, self.device)
        self.text_encoder = self.tokenizer = None
        if self.has_text:
            from transformers import CLIPTextModel, CLIPTokenizer

            self.tokenizer = CLIPTokenizer.from_pretrained(self.model / "tokenizer")
            self.text_encoder = CLIPTextModel.from_pretrained(self.model / "text_encoder", use_safetensors=True)
            self.text_encoder = self.text_encoder.to(self.device, torch.float32).eval()

    @property
    def scaling_factor(self):
        return float(self.vae.config.scaling_factor)

    @property
    def shift_factor(self):
        shift = getattr(self.vae.config, "shift_factor", None)
        return None if shift is None else float(shift)

    @property
    def downsampling(self):
        """The VAE's spatial factor: 2^(number of encoder blocks − 1)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def latent_shape(self, resolution):
        if resolution % self.downsampling:
            raise ConfigError(f"--resolution {resolution} is not a multiple of the VAE's downsampling "
                              f"factor {self.downsampling}")
        side = resolution // self.downsampling
        return [int(self.vae.config.latent_channels), side, side]

    @torch.inference_mode()
    def latents(self, x, indices, posterior="mean", seed=0):
        """z of images ``x`` (B, 3, R, R) in [−1, 1], samples ``indices``: (B, C, h, w) float32 on the CPU."""
        dist = self.vae.encode(torch.as_tensor(x).to(self.device, torch.float32)).latent_dist
        z = dist.mean
        if posterior == "sample":
            eps = torch.stack([posterior_noise(seed, i, tuple(z.shape[1:])) for i in indices])
            z = z + dist.std * eps.to(z.device)
        if self.shift_factor is not None:
            z = z - self.shift_factor
        return (z * self.scaling_factor).float().cpu()

    @torch.inference_mode()
    def text(self, captions):
        """T(c) for each caption: (B, L, D) float32 on the CPU."""
        tok = self.tokenizer(list(captions), padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt")
        mask = tok.attention_mask.to(self.device) if getattr(self.text_encoder.config, "use_attention_mask", False) \
            else None
        out = self.text_encoder(tok.input_ids.to(self.device), attention_mask=mask)
        return out.last_hidden_state.float().cpu()
