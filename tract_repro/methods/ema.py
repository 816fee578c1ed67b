"""Bias-corrected exponential moving average of a module (μ_S and μ_I; method-spec §5)."""
import copy

import torch

from tract_repro.common.errors import ConfigError


def momentum_from_residual(residual, steps):
    """μ = r^(1/n): after n updates the starting weights keep a residual weight r."""
    if not 0.0 < residual < 1.0:
        raise ConfigError(f"EMA residual must be in (0, 1), got {residual}")
    if steps < 1:
        raise ConfigError(f"EMA residual needs at least one step per phase, got {steps}")
    return residual ** (1.0 / steps)


class EMA:
    """θ_ema ← θ_ema + d·(θ − θ_ema), d = (1 − μ)/(1 − μ^k) at the k-th update (k = 1 copies)."""

    def __init__(self, module, momentum):
        self.module = copy.deepcopy(module).eval().requires_grad_(False)
        self.momentum = momentum
        self.steps = 0

    @property
    def momentum(self):
        return self._momentum

    @momentum.setter
    def momentum(self, value):
        if not 0.0 <= value < 1.0:
            raise ConfigError(f"EMA momentum must be in [0, 1), got {value}")
        self._momentum = float(value)

    def decay(self):
        """The weight d of the next update."""
        mu, k = self._momentum, self.steps + 1
        return (1.0 - mu) / (1.0 - mu**k)

    @torch.no_grad()
    def update(self, source):
        d = self.decay()
        self.steps += 1
        mine, theirs, buffers = self._pairs(source)
        torch._foreach_lerp_(mine, theirs, d)  # p.lerp_(θ, d) for every parameter at once
        for b, src in buffers:
            if b.is_floating_point():
                b.lerp_(src, d)
            else:
                b.copy_(src)

    def _pairs(self, source):
        """(EMA parameters, source parameters, [(EMA buffer, source buffer)]) matched by name, looked up once
        per source module (a module's tensors keep their identity; load_state_dict copies into them)."""
        if getattr(self, "_cached", (None,))[0] is not source:
            src, src_buffers = dict(source.named_parameters()), dict(source.named_buffers())
            names = [name for name, _ in self.module.named_parameters()]
            self._cached = (source, [p for _, p in self.module.named_parameters()], [src[n].detach() for n in names],
                            [(b, src_buffers[n]) for n, b in self.module.named_buffers()])
        return self._cached[1:]

    def restart(self):
        """Forget the history: the next update copies the source."""
        self.steps = 0

    def state_dict(self):
        return {"module": self.module.state_dict(), "steps": self.steps, "momentum": self._momentum}

    def load_state_dict(self, state):
        self.module.load_state_dict(state["module"])
        self.steps, self.momentum = int(state["steps"]), float(state["momentum"])
