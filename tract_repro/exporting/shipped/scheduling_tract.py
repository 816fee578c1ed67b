"""The time grid of a tract-repro run as a diffusers scheduler config (shipped in ``scheduler/`` of an export).

``scheduler_config.json`` holds the run's grid i = 0..T: the log-SNR λ_i and, for reading, α_i and σ_i
(VP: α² = sigmoid(λ), σ² = sigmoid(−λ); index 0 is the clean end), with the parameterisation of the network
head, the step counts the model was distilled for and how guidance reaches it.  ``set_timesteps(K)`` picks the
K + 1 grid indices T, T − T/K, …, 0 of K DDIM steps (K must divide T), exactly as tract-repro's ``ddim``
sampler does.  The step itself is written out in ``pipeline.py``.
"""
import operator

import torch
from diffusers import ConfigMixin, SchedulerMixin
from diffusers.configuration_utils import register_to_config


class TractDDIMScheduler(SchedulerMixin, ConfigMixin):
    """The K-step DDIM grid of a tract-repro run (clipped x̂), as data: λ, α, σ on its T-grid."""

    config_name = "scheduler_config.json"
    order = 1

    @register_to_config
    def __init__(self, T=1024, logsnr=(), alpha=(), sigma=(), noise_schedule="CosineSchedule", process="vp",
                 parameterisation="v", clip_x0=True, distilled_steps=(), default_steps=None, guidance="none",
                 w_range=None):
        if len(logsnr) != T + 1:
            raise ValueError(f"scheduler_config.json: logsnr has {len(logsnr)} values, T = {T} needs {T + 1}")
        self.grid_logsnr = torch.tensor(list(logsnr), dtype=torch.float64)
        self.timesteps = None
        self.num_inference_steps = None

    def valid_steps(self):
        """Every K this grid samples with: the divisors of T."""
        T = self.config.T
        return [k for k in range(1, T + 1) if T % k == 0]

    def set_timesteps(self, num_inference_steps, device=None):
        """The grid indices T, T − T/K, …, 0 of K steps; K must divide T."""
        K, T = num_inference_steps, self.config.T
        try:
            K = operator.index(K)  # an int, or numpy's, torch's
        except TypeError:
            K = None
        if K is None or K < 1 or T % K:
            raise ValueError(f"num_inference_steps={num_inference_steps!r}: K must divide T = {T}, one of {self.valid_steps()} "
                             f"(distilled for {list(self.config.distilled_steps)})")
        self.num_inference_steps = K
        self.timesteps = torch.arange(T, -1, -(T // K))
        return self.timesteps

    def logsnrs(self, device=None):
        """λ at the K + 1 indices of :meth:`set_timesteps`, noisiest first (float64)."""
        return self.grid_logsnr[self.timesteps].to(device)
