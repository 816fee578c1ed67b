"""A tract-repro student (or teacher) as a diffusers pipeline: its exact K-step DDIM sampler, written out here.

    from diffusers import DiffusionPipeline
    pipe = DiffusionPipeline.from_pretrained("EXPORT_DIR", trust_remote_code=True)
    images = pipe(num_inference_steps=1, generator=torch.Generator().manual_seed(0), batch_size=4).images

The components are ``unet`` (tract-repro's network, ``unet/tract_unet.py``) and ``scheduler`` (the run's time
grid, ``scheduler/scheduling_tract.py``).  Every step below is tract-repro's own, in float64 with the network in
float32, so that the pipeline's samples equal tract-repro's ``ddim`` samples from the same noise:

    x_T = σ_T · z,   z ~ N(0, I)                                   (the noise, or ``latents``)
    for each step t → s of the K-step grid (indices T, T − T/K, …, 0):
        α, σ = √sigmoid(λ), √sigmoid(−λ)                          (VP)
        x̂   = parameterisation(x_t, F(x_t, λ_t, labels, w), α_t, σ_t), clipped to [−1, 1]
        ε̂   = (x_t − α_t·x̂)/σ_t
        x_s = α_s·x̂ + σ_s·ε̂
    image = clip(x_0, −1, 1)

Guidance: a w-conditioned student takes w as a network input (``guidance_weight``); a teacher trained with
label dropout is guided as x̂^w = (1 + w)·x̂(x_t, c) − w·x̂(x_t, ∅) from one call on the doubled batch (w = 0 is
the conditional model; diffusers' guidance scale is s = 1 + w).  Draw the noise with one generator per sample,
``generator=[torch.Generator().manual_seed(seed) for seed in seeds]``, to get tract-repro's per-seed noise.
"""
import numpy as np
import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput

NULL_LABEL = -1  # the null class ∅ of classifier-free guidance


def x_from_head(parameterisation, x_t, out, alpha, sigma):
    """x̂ from the network head (tract-repro's parameterisations)."""
    if parameterisation == "x":
        return out
    if parameterisation == "eps":
        return (x_t - sigma * out) / alpha
    if parameterisation == "v":
        return alpha * x_t - sigma * out
    if parameterisation == "both":  # x and ε heads stacked on channels, mixed by γ = α²
        x_head, eps_head = out.chunk(2, dim=1)
        gamma = alpha * alpha
        return (1 - gamma) * x_head + gamma * ((x_t - sigma * eps_head) / alpha)
    raise ValueError(f"unknown parameterisation {parameterisation!r}")


def ddim_step(x_t, x_hat, alpha_t, sigma_t, alpha_s, sigma_s):
    """One deterministic DDIM step t → s with x̂ clipped to [−1, 1]."""
    x_hat = x_hat.clamp(-1.0, 1.0)
    eps_hat = (x_t - alpha_t * x_hat) / sigma_t
    return alpha_s * x_hat + sigma_s * eps_hat


class TractPipeline(DiffusionPipeline):
    """K-step DDIM sampling of a tract-repro run: ``unet`` (TractUNet) and ``scheduler`` (TractDDIMScheduler)."""

    def __init__(self, unet, scheduler):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)

    def _denoise(self, x_t, logsnr, labels, extra):
        """x̂ = D(x_t, λ, labels, extra): the network in its own dtype (float32 as saved), x̂ in float64."""
        alpha, sigma = torch.sigmoid(logsnr).sqrt(), torch.sigmoid(-logsnr).sqrt()
        alpha, sigma = alpha.view(-1, 1, 1, 1), sigma.view(-1, 1, 1, 1)
        dtype = self.unet.dtype
        cond = {k: v.to(dtype) for k, v in extra.items()} or None
        out = self.unet(x_t.to(dtype), logsnr.to(dtype), labels, cond=cond)
        return x_from_head(self.scheduler.config.parameterisation, x_t, out.to(x_t.dtype), alpha, sigma)

    def _guided(self, x_t, logsnr, labels, w):
        """x̂^w = (1 + w)·x̂(x_t, c) − w·x̂(x_t, ∅), both halves from one call on the doubled batch."""
        if not bool(w.any()):
            return self._denoise(x_t, logsnr, labels, {})
        out = self._denoise(torch.cat([x_t, x_t]), torch.cat([logsnr, logsnr]),
                            torch.cat([labels, torch.full_like(labels, NULL_LABEL)]), {})
        n = x_t.shape[0]
        w = w.reshape(-1, 1, 1, 1).to(out.dtype)
        return (1 + w) * out[:n] - w * out[n:]

    def _inputs(self, batch_size, class_labels, guidance_weight, device):
        """(labels, w) for the batch, refusing in one line what this model cannot take or needs."""
        guidance = self.scheduler.config.guidance
        if self.unet.num_classes > 1:
            if class_labels is None:
                raise ValueError(f"this model is class-conditional ({self.unet.num_classes} classes): "
                                 f"give class_labels, one per sample")
            labels = torch.as_tensor(class_labels, dtype=torch.long).reshape(-1)
            labels = labels.expand(batch_size) if labels.numel() == 1 else labels
            if labels.numel() != batch_size:
                raise ValueError(f"class_labels: {labels.numel()} labels for {batch_size} samples: give one per sample")
            labels = labels.to(device)
        elif class_labels is not None:
            raise ValueError("this model is unconditional: leave class_labels out")
        else:
            labels = None
        if guidance == "input" and guidance_weight is None:
            raise ValueError("this model takes a guidance weight w as an input: give guidance_weight, e.g. 1.0")
        if guidance == "none" and guidance_weight is not None:
            raise ValueError("this model takes no guidance weight (no w input, no label dropout): leave guidance_weight out")
        if guidance_weight is None:
            return labels, None
        w = torch.as_tensor(guidance_weight, dtype=torch.float64).reshape(-1)
        w = (w.expand(batch_size) if w.numel() == 1 else w).to(device)
        if w.numel() != batch_size:
            raise ValueError(f"guidance_weight: {w.numel()} weights for {batch_size} samples: give one, or one per sample")
        low, high = self.scheduler.config.w_range or (None, None)
        if guidance == "input" and low is not None and not bool(((w >= low) & (w <= high)).all()):
            print(f"warning: this student was trained on w in [{low:g}, {high:g}]: it never saw w = "
                  f"{sorted(set(w.tolist()))}")
        return labels, w

    @torch.no_grad()
    def __call__(self, num_inference_steps=None, generator=None, latents=None, batch_size=1, class_labels=None,
                 guidance_weight=None, output_type="pil", return_dict=True):
        """K-step samples: ``images`` in [0, 1] (PIL images, NHWC float64 numpy, or NCHW float64 torch).

        ``num_inference_steps``: K, a divisor of T (default: the step count the model was distilled for);
        ``latents``: the standard-normal noise z (B, C, H, W), else drawn from ``generator`` (one generator, or
        one per sample); ``class_labels``: one class per sample (class-conditional models); ``guidance_weight``:
        w (w-conditioned students, or guided teachers; s = 1 + w).
        """
        if output_type not in ("pil", "np", "pt"):
            raise ValueError(f"output_type={output_type!r}: choose 'pil', 'np' or 'pt'")
        steps = self.scheduler.config.default_steps if num_inference_steps is None else num_inference_steps
        self.scheduler.set_timesteps(steps)
        device = self._execution_device
        shape = tuple(self.unet.image_shape)
        if latents is None:
            if isinstance(generator, list):
                batch_size = len(generator)
                latents = torch.stack([torch.randn(shape, generator=g, dtype=torch.float64) for g in generator])
            else:
                latents = torch.randn((batch_size, *shape), generator=generator, dtype=torch.float64)
        elif tuple(latents.shape[1:]) != shape:
            raise ValueError(f"latents of shape {tuple(latents.shape)}: this model makes (B, {', '.join(map(str, shape))})")
        z = latents.to(device=device, dtype=torch.float64)
        n = z.shape[0]
        labels, w = self._inputs(n, class_labels, guidance_weight, device)
        logsnrs = self.scheduler.logsnrs(device)
        x = torch.sigmoid(-logsnrs[:1]).sqrt().view(-1, 1, 1, 1) * z  # x_T = σ_T·z
        for lam_t, lam_s in self.progress_bar(list(zip(logsnrs[:-1], logsnrs[1:]))):
            lam_t, lam_s = lam_t.expand(n), lam_s.expand(n)
            alpha_t, sigma_t = torch.sigmoid(lam_t).sqrt().view(-1, 1, 1, 1), torch.sigmoid(-lam_t).sqrt().view(-1, 1, 1, 1)
            alpha_s, sigma_s = torch.sigmoid(lam_s).sqrt().view(-1, 1, 1, 1), torch.sigmoid(-lam_s).sqrt().view(-1, 1, 1, 1)
            if self.scheduler.config.guidance == "classifier-free" and w is not None:
                x_hat = self._guided(x, lam_t, labels, w)
            else:
                x_hat = self._denoise(x, lam_t, labels, {} if w is None else {"w": w})
            x = ddim_step(x, x_hat, alpha_t, sigma_t, alpha_s, sigma_s)
        images = (x.clamp(-1, 1) / 2 + 0.5).clamp(0, 1).cpu()
        if output_type == "pt":
            result = images
        else:
            result = images.permute(0, 2, 3, 1).numpy()
            if output_type == "pil":
                result = self.numpy_to_pil(result.astype(np.float32))
        return ImagePipelineOutput(images=result) if return_dict else (result,)
