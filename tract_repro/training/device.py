"""Where and how the networks run: device, TF32, bf16 autocast, channels-last and where noise is drawn, bound in gin.

With ``noise = 'cpu'`` (the default) the per-sample draws of a step (augmentation, t, ε) come from
the run's CPU generator and are moved to the device, so a run's noise does not depend on the device
it runs on.  With ``noise = 'device'`` they are drawn on the device from a generator seeded by
(seed, step) (:func:`tract_repro.common.batch_random.step_generator`): no host-to-device copy of
the batch's noise each step, at the price of other numbers than a CPU run's.  The data order
always comes from the CPU.
"""
import contextlib

import gin
import torch

from tract_repro.common.errors import ConfigError

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@gin.configurable
class Device:
    """``name``: 'cpu', 'cuda', 'cuda:N' or 'auto' (CUDA when available); GPU options are off by default."""

    NOISE = ("cpu", "device")

    PRECISIONS = {"float64": torch.float64, "float32": torch.float32}

    def __init__(self, name="auto", tf32=False, autocast=None, channels_last=False, noise="cpu", compile=False,
                 precision="float64"):
        if name == "auto":
            name = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(name)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"Device.name = {name!r} but CUDA is not available here: set Device.name = 'cpu' (or 'auto')")
        if autocast not in (None, *AUTOCAST_DTYPES):
            raise ConfigError(f"Device.autocast = {autocast!r}: choose None, {' or '.join(map(repr, AUTOCAST_DTYPES))}")
        if noise not in self.NOISE:
            raise ConfigError(f"Device.noise = {noise!r}: choose 'cpu' (the run's CPU generator) or 'device' "
                              f"(drawn on the device, seeded by seed and step)")
        self.tf32, self.autocast_dtype, self.channels_last = bool(tf32), autocast, bool(channels_last)
        if not isinstance(compile, (bool, str)):
            raise ConfigError(f"Device.compile = {compile!r}: give True (torch.compile's inductor), False, or a "
                              f"torch.compile backend name such as 'aot_eager'")
        if precision not in self.PRECISIONS:
            raise ConfigError(f"Device.precision = {precision!r}: choose 'float64' (every tensor of a target) or "
                              f"'float32' (full-size tensors in float32; λ, α, σ and the DDIM coefficients in float64)")
        self.noise, self.compile, self.precision = noise, compile, precision
        self.dtype = self.PRECISIONS[precision]
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = self.tf32
            torch.backends.cudnn.allow_tf32 = self.tf32

    @property
    def is_cuda(self):
        return self.device.type == "cuda"

    def prepare(self, module):
        """Move a module to the device (channels-last memory format if asked)."""
        module = module.to(self.device)
        return module.to(memory_format=torch.channels_last) if self.channels_last else module

    def compile_networks(self, *denoisers):
        """``torch.compile`` each denoiser's network in place (``Module.compile``: its state-dict keys stay as they
        are, so checkpoints do not change), if ``compile`` is set (True: the inductor backend; a string: that
        backend).  The network compiled is the one the denoiser calls: ``net``, or an EDM wrapper's ``net.model``."""
        if self.compile is False:
            return
        options = {} if self.compile is True else dict(backend=self.compile)
        for denoiser in denoisers:
            if denoiser is not None:
                net = denoiser.net
                getattr(net, "model", net).compile(**options)

    def autocast(self):
        """The mixed-precision context for network calls (a no-op without ``autocast``)."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=AUTOCAST_DTYPES[self.autocast_dtype])

    def rng_state(self):
        """RNG state beyond the CPU's (the CUDA generator drives dropout on the GPU)."""
        return torch.cuda.get_rng_state(self.device) if self.is_cuda else None

    def set_rng_state(self, state):
        if state is not None and self.is_cuda:
            torch.cuda.set_rng_state(state, self.device)

    def describe(self):
        info = dict(device=str(self.device), tf32=self.tf32, autocast=self.autocast_dtype, channels_last=self.channels_last,
                    noise=self.noise, compile=self.compile, precision=self.precision)
        if self.is_cuda:
            info["gpu"] = torch.cuda.get_device_name(self.device)
        return info
