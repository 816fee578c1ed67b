"""Image editing with a distilled latent text-to-image student (Meng et al. 2023, §4.2): SDEdit-style img2img and
inpainting, ``python -m tract_repro.edit {img2img,inpaint} RUN --image IMG --prompt TEXT --steps K ... --out GRID.png``.

The image is prepared as the run's encoder prepared its training images (largest centred square, bicubic to the
encoding's resolution R: :func:`tract_repro.data.latent_sources.prepare`), encoded by the VAE of the model folder the
run's latent data set names, z = E(x) (the posterior mean, scaled as the encoding scaled it), and the prompt is embedded
by that folder's text encoder (:meth:`Encoders.text`); the folder's files must still be the ones the encoding
recorded.  Sampling uses the run's K-step DDIM levels λ_0 > … (noisiest first), ``logsnrs(grid, K)`` (grid indices
T, T − T/K, …, 0), unclipped (latents are unbounded), with the prompt's conditioning (``--w``: the run at guidance
weight w, :func:`~tract_repro.evaluation.metrics.conditioned`).  ε_i is seed i's standard noise alone
(:func:`~tract_repro.sampling.samplers.noise_from_seeds`), and each seed is sampled as a batch of its own, so output i
depends on seed i alone, bit for bit (a batched float32 network call can differ in its last bits).

**img2img, strength S ∈ (0, 1].**  n = ⌊S·K + ½⌋ of the K steps are run (S is the fraction of the K-step path
that is regenerated, counted from the clean end): the start is level λ_{K−n} of the K-step sequence, grid index
n·T/K, where x = α·z + σ·ε_i, followed by the last n DDIM steps.  S = 1 (n = K) is text-to-image: the start is the
sampler's own x = σ_T·ε_i at the noisiest level (the image is not used), exactly what
``registry.sample('ddim', …)`` draws from the same noise.  n = 0 (S < 1/(2K)) runs no step: the output latent is
z, the VAE's reconstruction.

**inpaint.**  The mask (white = regenerate; the same size as the image, cropped as the image is and resized to R
by nearest neighbour) becomes a binary latent mask m: a latent cell is regenerated if any pixel of its f×f block
(f = R / latent side) is white (gray ≥ 128).  Sampling starts from σ_T·ε_i, and before every one of the K steps,
at level λ_t, the known region (m = 0) is replaced by the encoded image noised to that level with the same ε_i,
α_t·z + σ_t·ε_i (the forward path deterministic DDIM follows from z); after the last step the known region is z
itself, so it is exactly the image's latent (an all-black mask returns z: the VAE's reconstruction).  This "replace
the known region" scheme needs nothing but the student's denoiser, so it works with any distilled student at any
K; an inpainting teacher (a UNet with the masked image and mask as extra input channels, as SD's inpainting
checkpoints) is not used because no such teacher exists in this pipeline and its student would need a
distillation of its own.

Output: one PNG grid (the prepared input first, for inpaint with the regenerated region grey, then one decoded
output per seed, captioned with the seed and the prompt), written atomically; everything is checked first (one line,
exit 2, nothing written), and ``--out`` is never overwritten.
"""
import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tract_repro.common.cli import command
from tract_repro.common.errors import ConfigError

SAMPLER = "ddim"


def strength_steps(strength, steps):
    """n = ⌊S·K + ½⌋: how many of the K steps img2img at strength S runs; one line for S outside (0, 1]."""
    strength = float(strength)
    if not (0.0 < strength <= 1.0) or math.isnan(strength):
        raise ConfigError(f"--strength {strength:g} is not in (0, 1]: 1 regenerates from pure noise (text-to-image), "
                          "smaller keeps more of the image")
    return int(math.floor(strength * steps + 0.5))


def _check_out(out):
    out = Path(out)
    if out.suffix.lower() != ".png":
        raise ConfigError(f"--out {out}: give a .png file, e.g. edit.png")
    if out.exists():
        raise ConfigError(f"--out {out} exists: remove it or choose another file (nothing is overwritten)")
    return out


def _check_file(path, what):
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--{what} {path} not found: give an image file (PNG, JPEG, WebP)")
    return path


def _check_seeds(seeds):
    seeds = [int(s) for s in seeds]
    if not seeds or min(seeds) < 0:
        raise ConfigError(f"--seeds {' '.join(map(str, seeds))}: give at least one seed, each at least 0")
    return seeds


def check_latent_text_run(run):
    """One line unless ``run`` trained on a text-conditioned latent encoding (a Stable Diffusion student)."""
    data = getattr(run, "data", None)
    if data is None or not getattr(data, "encoded", False):
        raise ConfigError(f"{run.path} is not a latent text-to-image run (it samples images, not latents): editing "
                          "needs a run trained on a text-conditioned latent encoding "
                          "(python -m tract_repro.encode_latents)")
    if not getattr(data, "text", False):
        raise ConfigError(f"{run.path} is not a text-to-image run ({data.folder} holds no caption embeddings): editing "
                          "needs a run trained on a text-conditioned latent encoding")


@dataclass
class Editor:
    """A finished latent text-to-image run with its encoding's VAE and text encoder, ready to edit images."""

    run: object
    denoiser: object
    extra: dict
    encoders: object
    steps: int
    device: torch.device

    @property
    def data(self):
        return self.run.data

    @property
    def resolution(self):
        return int(self.data.manifest["resolution"])

    @property
    def shape(self):
        return tuple(self.data.shape)

    def logsnrs(self):
        """The run's K-step DDIM levels, noisiest first (K + 1 of them)."""
        from tract_repro.sampling import registry

        return registry.get(SAMPLER).logsnrs(self.run.grid, self.steps).to(self.device)

    def image(self, path):
        """(x (1, 3, R, R) float32 in [−1, 1] as the encoder prepared images, z (1, C, h, w) float64 = E(x))."""
        from tract_repro.data.latent_sources import prepare

        x = torch.from_numpy(prepare(Path(path).read_bytes(), self.resolution, key=str(path)))[None]
        z = self.encoders.latents(x, [0], posterior="mean")
        if tuple(z.shape[1:]) != self.shape:
            raise ConfigError(f"{path} encodes to latents {tuple(z.shape[1:])}, not the run's {self.shape}")
        return x, z.to(self.device, torch.float64)

    def cond(self, prompt, n):
        """The :class:`Cond` of ``n`` samples of ``prompt``: labels 0, its embedding, and w if the run takes one."""
        from tract_repro.networks.conditioning import Cond

        text = self.encoders.text([prompt]).expand(n, -1, -1).contiguous()
        extra = {"text": text, **{k: torch.full((n,), float(v), dtype=torch.float64)
                                  for k, v in (self.extra or {}).items()}}
        return Cond(torch.zeros(n, dtype=torch.long), extra).to(self.device)

    def noise(self, seeds):
        from tract_repro.sampling.samplers import noise_from_seeds

        return noise_from_seeds(seeds, self.shape).to(self.device)

    @torch.no_grad()
    def img2img(self, z, cond, seeds, strength):
        """Output latents (S, C, h, w) of img2img from latent z (1, C, h, w) at ``strength`` (see the module doc),
        each seed sampled alone (a batch of one)."""
        return torch.cat([self._img2img(z, cond[i:i + 1], [s], strength) for i, s in enumerate(seeds)])

    @torch.no_grad()
    def inpaint(self, z, regenerate, cond, seeds):
        """Output latents (S, C, h, w): K DDIM steps from σ_T·ε with the known region (``regenerate`` False,
        (1, 1, h, w) bool) replaced by α_t·z + σ_t·ε before every step and by z after the last; each seed alone."""
        return torch.cat([self._inpaint(z, regenerate, cond[i:i + 1], [s]) for i, s in enumerate(seeds)])

    def _img2img(self, z, cond, seeds, strength):
        from tract_repro.sampling.samplers import ddim

        grid, logsnrs = self.run.grid.to(self.device), self.logsnrs()
        n = strength_steps(strength, self.steps)
        eps = self.noise(seeds)
        tail = logsnrs[self.steps - n:]
        if n == 0:
            return z.expand_as(eps).clone()
        alpha, sigma = grid.alpha_sigma(tail[:1])
        x = sigma * eps if n == self.steps else alpha * z + sigma * eps
        return ddim(self.denoiser, x, tail, grid.alpha_sigma, cond, clip=False)

    def _inpaint(self, z, regenerate, cond, seeds):
        from tract_repro.diffusion.ddim import ddim_step

        grid, logsnrs = self.run.grid.to(self.device), self.logsnrs()
        eps = self.noise(seeds)
        regenerate = regenerate.to(self.device)
        n = len(seeds)
        _, sigma = grid.alpha_sigma(logsnrs[:1])
        x = sigma * eps
        for lam_t, lam_s in zip(logsnrs[:-1], logsnrs[1:]):
            lam_t, lam_s = lam_t.expand(n), lam_s.expand(n)
            alpha_t, sigma_t = grid.alpha_sigma(lam_t)
            alpha_s, sigma_s = grid.alpha_sigma(lam_s)
            x = torch.where(regenerate, x, alpha_t * z + sigma_t * eps)
            x = ddim_step(x, self.denoiser(x, lam_t, cond), alpha_t, sigma_t, alpha_s, sigma_s, clip=False)
        return torch.where(regenerate, x, z.expand_as(x))

    def latent_mask(self, mask_path, image_path):
        """The binary latent mask (1, 1, h, w) bool of a mask image (white = regenerate); one line if its size
        differs from the image's."""
        from PIL import Image

        sizes = []
        for path in (image_path, mask_path):
            try:
                with Image.open(path) as im:
                    sizes.append(im.size)
            except Exception as exc:  # noqa: BLE001 (any decoding failure is the same fault for the user)
                raise ConfigError(f"cannot decode image {path}: {type(exc).__name__}: {' '.join(str(exc).split())}") \
                    from None
        (iw, ih), (mw, mh) = sizes
        if (iw, ih) != (mw, mh):
            raise ConfigError(f"--mask {mask_path} is {mw}x{mh} but --image {image_path} is {iw}x{ih}: give a mask "
                              "of the image's size (white = regenerate)")
        with Image.open(mask_path) as im:
            gray = im.convert("L")
        s = min(mw, mh)
        left, top = (mw - s) // 2, (mh - s) // 2
        square = gray.crop((left, top, left + s, top + s))
        r = self.resolution
        if s != r:
            square = square.resize((r, r), Image.Resampling.NEAREST)
        white = torch.from_numpy(np.asarray(square) >= 128)
        side = self.shape[-1]
        f = r // side
        cells = white.reshape(side, f, side, f).any(3).any(1)
        return cells[None, None]


def load_editor(run_dir, steps, w=None, device="cpu"):
    """The :class:`Editor` of a finished latent text-to-image run for K = ``steps``; one line for anything wrong."""
    from tract_repro.data.latent_models import Encoders, check_model_folder, component_digests
    from tract_repro.evaluation.metrics import conditioned
    from tract_repro.evaluation.runs import load_run
    from tract_repro.sampling import registry

    run = load_run(run_dir, with_data="encoded")
    check_latent_text_run(run)
    registry.get(SAMPLER).logsnrs(run.grid, int(steps))  # K divides T (one line otherwise)
    denoiser, extra, _ = conditioned(run, w)
    model = run.data.model
    check_model_folder(model)
    recorded = run.data.manifest["files_sha256"]
    now = component_digests(model, True)
    changed = sorted(k for k in set(now) | set(recorded) if now.get(k) != recorded.get(k))
    if changed:
        raise ConfigError(f"the model folder {model} is not the one that encoded {run.data.folder} ({changed[0]} "
                          "differs): restore it, or encode and train again")
    device = torch.device(device)
    return Editor(run, denoiser.to(device), extra, Encoders(model, device), int(steps), device)


def _write(editor, x, latents, seeds, prompt, out, first="input"):
    from tract_repro.sampling.images import save_captioned_grid

    images = editor.data.decode(latents).clamp(-1, 1).cpu().float()
    cells = torch.cat([x.float(), images])
    captions = [first] + [f"seed {s}: {prompt}" for s in seeds]
    scale = max(1, 128 // editor.resolution)
    return save_captioned_grid(cells, captions, out, ncol=len(cells), scale=scale)


def img2img(run_dir, image, prompt, strength, steps, out, w=None, seeds=(0, 1, 2, 3), device="cpu"):
    """Write the img2img grid of ``image`` to ``out``; returns (output latents, out)."""
    out, image, seeds = _check_out(out), _check_file(image, "image"), _check_seeds(seeds)
    strength_steps(strength, 1)
    editor = load_editor(run_dir, steps, w, device)
    x, z = editor.image(image)
    latents = editor.img2img(z, editor.cond(prompt, len(seeds)), seeds, strength)
    _check_out(out)
    return latents, _write(editor, x, latents, seeds, prompt, out)


def inpaint(run_dir, image, mask, prompt, steps, out, w=None, seeds=(0, 1, 2, 3), device="cpu"):
    """Write the inpainting grid of ``image`` under ``mask`` to ``out``; returns (output latents, out)."""
    out, image, seeds = _check_out(out), _check_file(image, "image"), _check_seeds(seeds)
    mask = _check_file(mask, "mask")
    editor = load_editor(run_dir, steps, w, device)
    regenerate = editor.latent_mask(mask, image)
    x, z = editor.image(image)
    latents = editor.inpaint(z, regenerate, editor.cond(prompt, len(seeds)), seeds)
    pixels = regenerate.repeat_interleave(editor.resolution // editor.shape[-1], 2) \
        .repeat_interleave(editor.resolution // editor.shape[-1], 3)
    shown = torch.where(pixels, torch.zeros_like(x), x)  # the regenerated region grey
    _check_out(out)
    return latents, _write(editor, shown, latents, seeds, prompt, out, first="input (grey: regenerated)")


def _parser():
    parser = argparse.ArgumentParser(prog="python -m tract_repro.edit", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("img2img", "inpaint"):
        p = sub.add_parser(name)
        p.add_argument("run", help="a finished latent text-to-image run (a Stable Diffusion student)")
        p.add_argument("--image", required=True)
        if name == "inpaint":
            p.add_argument("--mask", required=True, help="white = regenerate; the image's size")
        p.add_argument("--prompt", required=True)
        if name == "img2img":
            p.add_argument("--strength", type=float, required=True,
                           help="in (0, 1]: round(S*K) of the K steps are run; 1 = from pure noise")
        p.add_argument("--steps", type=int, required=True, help="K DDIM steps on the run's grid (K divides T)")
        p.add_argument("--w", type=float, default=None, help="guidance weight, for a run that takes one")
        p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
        p.add_argument("--device", default="cpu")
        p.add_argument("--out", required=True, help="the PNG grid to write (never overwritten)")
    return parser


@command
def main(argv=None):
    args = _parser().parse_args(sys.argv[1:] if argv is None else list(argv))
    common = dict(w=args.w, seeds=args.seeds, device=args.device)
    if args.command == "img2img":
        _, out = img2img(args.run, args.image, args.prompt, args.strength, args.steps, args.out, **common)
    else:
        _, out = inpaint(args.run, args.image, args.mask, args.prompt, args.steps, args.out, **common)
    print(f"wrote {out}", flush=True)
    return 0


if __name__ == "__main__":
    from tract_repro.launching.process import exit_now

    exit_now(main())
