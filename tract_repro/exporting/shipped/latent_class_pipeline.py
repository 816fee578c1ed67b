"""A class-conditional latent model as a diffusers pipeline: the stock UNet2DConditionModel, VAE and DDIMScheduler.

    from diffusers import DiffusionPipeline
    pipe = DiffusionPipeline.from_pretrained("EXPORT_DIR", trust_remote_code=True)
    images = pipe(class_labels=[0, 1, 2, 3], num_inference_steps=K).images

No stock diffusers pipeline takes class labels for a UNet2DConditionModel, so this file is the loop written
out; every component is diffusers' own (this is the only code the folder ships).  Each step is
StableDiffusionPipeline's, with the class embedding in place of the prompt:

    x_T = init_noise_sigma · latents                         (latents ~ N(0, I), or given)
    for t in scheduler.timesteps:
        out = unet(x_t, t, encoder_hidden_states = 0 (B, 1, D), class_labels = c)
        out = out(∅) + s·(out(c) − out(∅))                   (only if guidance_scale s > 1; ∅ = the last class row;
                                                               a w student instead: timestep_cond = e(s − 1))
        x   = scheduler.step(out, t, x_t).prev_sample
    image = vae.decode(x_0 / scaling_factor + shift_factor)  (or x_0 itself, output_type="latent")

The cross-attention layers, if any, attend to one zero token, as tract-repro's diffusers adapter feeds them.

A guided-distillation student (a UNet with ``time_cond_proj_dim``) takes the guidance weight as an input, as
StableDiffusionPipeline feeds such a UNet: ``timestep_cond = get_guidance_scale_embedding(w)`` with w =
guidance_scale − 1, one call a step and no classifier-free guidance on top (the student is guided already).

``sampler="stochastic"`` is Meng et al.'s stochastic N-step sampler, for a student distilled for it (N/2 steps
trained to jump two levels of the N-step grid): on the levels t_0 > … > t_{N−1} of the scheduler's N timesteps and
the clean end, from each level a deterministic DDIM jump two levels down, to k, then forward noise one level back
up, to s: z_s = √(ᾱ_s/ᾱ_k)·z_k + σ_{s|k}·ξ with σ²_{s|k} = (1 − e^{λ_s − λ_k})·(1 − ᾱ_s), e^λ = ᾱ/(1 − ᾱ); the last
step is deterministic.  ξ comes from ``generator`` (or ``renoise(i, like)``, step i's noise, to reproduce another
implementation's draws).  N network calls.
"""
import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput, StableDiffusionPipeline
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils.torch_utils import randn_tensor


class ClassLatentPipeline(DiffusionPipeline):
    """K-step sampling of a class-conditional latent UNet (``num_class_embeds`` = classes + 1, the last ∅)."""

    model_cpu_offload_seq = "unet->vae"

    def __init__(self, unet, vae, scheduler):
        super().__init__()
        self.register_modules(unet=unet, vae=vae, scheduler=scheduler)
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)

    @property
    def num_classes(self):
        return int(self.unet.config.num_class_embeds) - 1

    def _labels(self, class_labels):
        labels = torch.as_tensor(class_labels, dtype=torch.long, device=self._execution_device).reshape(-1)
        if labels.numel() == 0 or bool(((labels < 0) | (labels >= self.num_classes)).any()):
            raise ValueError(f"class_labels must be classes 0..{self.num_classes - 1}, one per sample")
        return labels

    def _x0_eps(self, out, x, alpha_bar):
        """(x̂, ε̂) from the UNet's output at ᾱ, by the scheduler's prediction type."""
        a, s = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
        kind = self.scheduler.config.prediction_type
        if kind == "epsilon":
            return (x - s * out) / a, out
        if kind == "v_prediction":
            return a * x - s * out, a * out + s * x
        if kind == "sample":
            return out, (x - a * out) / s
        raise ValueError(f"prediction_type {kind!r} is not one this pipeline knows")

    def _levels(self, device):
        """ᾱ at the scheduler's timesteps and at the clean end (its final ᾱ), float64."""
        alphas = self.scheduler.alphas_cumprod.to(device=device, dtype=torch.float64)
        final = torch.as_tensor(self.scheduler.final_alpha_cumprod, dtype=torch.float64, device=device)
        return torch.cat([alphas[self.scheduler.timesteps.to(device)], final.reshape(1)])

    @torch.no_grad()
    def __call__(self, class_labels, num_inference_steps=50, guidance_scale=1.0, generator=None, latents=None,
                 output_type="pil", return_dict=True, sampler="ddim", renoise=None):
        if sampler not in ("ddim", "stochastic"):
            raise ValueError(f"sampler={sampler!r}: give 'ddim' or 'stochastic' (Meng et al.'s, for a student "
                             f"distilled for it)")
        unet, device = self.unet, self._execution_device
        labels = self._labels(class_labels)
        n = labels.shape[0]
        size = unet.config.sample_size
        shape = (n, unet.config.in_channels, size, size)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=unet.dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents of shape {tuple(latents.shape)} given for {n} class labels: expected {shape}")
        x = latents.to(device=device, dtype=unet.dtype) * self.scheduler.init_noise_sigma
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        dim = unet.config.time_cond_proj_dim
        guided = guidance_scale > 1.0 and dim is None  # a UNet with a w input is guided already
        rows = torch.cat([labels, torch.full_like(labels, self.num_classes)]) if guided else labels
        context = x.new_zeros(rows.shape[0], 1, unet.config.cross_attention_dim)
        w_input = None
        if dim is not None:  # diffusers' own embedding of w = guidance_scale − 1, as StableDiffusionPipeline's
            w = torch.tensor(guidance_scale - 1.0).repeat(n)
            w_input = StableDiffusionPipeline.get_guidance_scale_embedding(self, w, embedding_dim=dim).to(device, x.dtype)

        def predict(x, t):
            x_in = self.scheduler.scale_model_input(torch.cat([x, x]) if guided else x, t)
            out = unet(x_in, t, encoder_hidden_states=context, class_labels=rows, timestep_cond=w_input,
                       return_dict=False)[0]
            if guided:
                cond, null = out.chunk(2)
                out = null + guidance_scale * (cond - null)
            return out

        if sampler == "ddim":
            for t in self.progress_bar(self.scheduler.timesteps):
                x = self.scheduler.step(predict(x, t), t, x, return_dict=False)[0]
        else:
            x = self._stochastic(predict, x, generator, renoise)
        if output_type == "latent":
            images = x
        else:
            shift = getattr(self.vae.config, "shift_factor", None) or 0.0
            decoded = self.vae.decode(x / self.vae.config.scaling_factor + shift, return_dict=False)[0]
            images = self.image_processor.postprocess(decoded, output_type=output_type)
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=images) if return_dict else (images,)

    def _stochastic(self, predict, x, generator, renoise):
        """Meng et al.'s stochastic sampler on the N timesteps and the clean end (see the module's docstring)."""
        timesteps, levels = self.scheduler.timesteps, self._levels(x.device)
        steps, dtype = len(timesteps), x.dtype

        def jump(x, i, j):  # deterministic DDIM from level i to level j
            x0, eps = self._x0_eps(predict(x, timesteps[i]).double(), x.double(), levels[i])
            return (levels[j].sqrt() * x0 + (1 - levels[j]).sqrt() * eps).to(dtype)

        for i in self.progress_bar(range(steps - 1)):
            k, s = levels[i + 2], levels[i + 1]  # two levels down, then one back up
            z_k = jump(x, i, i + 2)
            xi = renoise(i, z_k) if renoise is not None else randn_tensor(
                z_k.shape, generator=generator, device=z_k.device, dtype=z_k.dtype)
            ratio = (s / (1 - s)) / (k / (1 - k)) if k < 1 else torch.zeros((), dtype=torch.float64)  # e^{λ_s − λ_k}
            var = ((1 - ratio) * (1 - s)).clamp(min=0)
            x = ((s / k).sqrt() * z_k.double() + var.sqrt() * xi.double()).to(dtype)
        return jump(x, steps - 1, steps)
