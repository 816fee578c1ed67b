"""The network of a tract-repro run as a diffusers model component (shipped in ``unet/`` of an export).

Our Progressive-Distillation UNet does not map onto diffusers' ``UNet2DModel`` (its time input is the
log-SNR λ through u = arctan(exp(−λ/2))/(π/2), its class and guidance-weight embeddings are summed into
the time embedding, and its block layout differs), so the network stays ours: this component builds
``tract_repro.networks.unet.UNet`` from the keyword arguments in ``config.json`` (``pip install tract-repro``
is needed) and diffusers stores its weights as it stores any model's, in
``diffusion_pytorch_model.safetensors``.  The keys are ``net.<our parameter name>``, the same keys as
tract-repro's denoiser state dict.

``forward(x, logsnr, class_labels=None, cond=None)`` is the network head F(x_t, λ, labels, {name: value}),
float32 in and out; turning it into x̂ (the parameterisation) is the pipeline's job.
"""
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config

NETWORKS = ("UNet",)


class TractUNet(ModelMixin, ConfigMixin):
    """tract-repro's PD UNet behind diffusers' ModelMixin/ConfigMixin (save_pretrained/from_pretrained)."""

    @register_to_config
    def __init__(self, network="UNet", network_kwargs=None):
        super().__init__()
        if network not in NETWORKS:
            raise ValueError(f"unknown tract-repro network {network!r}: this component builds one of {NETWORKS}")
        from tract_repro.networks.unet import UNet

        self.net = UNet(**dict(network_kwargs or {}))

    @property
    def image_shape(self):
        """(C, H, W) of the images the network denoises."""
        return (self.net.in_channels, self.net.resolution, self.net.resolution)

    @property
    def num_classes(self):
        return self.net.num_classes

    @property
    def extra_conditions(self):
        return self.net.extra_conditions

    def forward(self, x, logsnr, class_labels=None, cond=None):
        return self.net(x, logsnr, class_labels, cond=cond)
