"""EDM's preconditioned denoiser behind the project's contract D(x_t, λ, cond) → x̂ (method-spec §6).

D(x, σ) = c_skip(σ)·x + c_out(σ)·F(c_in(σ)·x, c_noise(σ)) with σ = exp(−λ/2) (VE, α = 1).  The
coefficients and D are float64; only the inner network F runs in float32.

``net`` is an EDMPrecond-like module that holds EDM's inner network as ``net.model`` (called as
``model(x, noise_labels, class_labels)``); its own preconditioning is not used.  Because the
denoiser stores it as ``self.net``, the denoiser's state-dict keys are ``net.model.…``: the
``model.…`` keys of an NVIDIA pickle (:func:`tract_repro.networks.edm_pickle.load_edm_pickle`)
load into ``denoiser.net``, e.g. ``denoiser.net.load_state_dict(checkpoint.state_dict)``.
"""
import torch
from torch import nn
from torch.nn import functional as F

from tract_repro.common.errors import ConfigError
from tract_repro.diffusion import edm
from tract_repro.networks.conditioning import NULL_LABEL, as_cond


def _num_classes(net):
    """``net.num_classes`` if set, else EDM's ``label_dim`` (0 for unconditional), else 1."""
    n = getattr(net, "num_classes", None)
    if n is None:
        n = getattr(net, "label_dim", None)
    return 1 if n is None else int(n)


class EDMDenoiser(nn.Module):
    """x̂ = c_skip·x_t + c_out·F(c_in·x_t, c_noise, one-hot labels), σ = exp(−λ/2), σ_d = 0.5 (method-spec §6)."""

    def __init__(self, net, sigma_data=edm.SIGMA_DATA):
        super().__init__()
        if not hasattr(net, "model"):
            raise ConfigError(f"EDMDenoiser needs an EDMPrecond-like net with a `model` submodule, got {type(net).__name__}")
        self.net = net
        self.sigma_data = float(sigma_data)

    @property
    def num_classes(self):
        return _num_classes(self.net)

    @property
    def conditional(self):
        return self.num_classes > 1

    def class_labels(self, labels, batch):
        """The float32 one-hot (B, num_classes) labels of a conditional net, else None.

        Integer labels are one-hot encoded; float (B, num_classes) rows are passed through.  A
        conditional net called without labels, and the null class ∅ (label −1), get all-zero rows:
        EDM's own label dropout zeroes the one-hot row, so that is what a net trained with it has
        learnt as "no class".
        """
        if not self.conditional:
            return None
        k = self.num_classes
        if labels is None:
            return torch.zeros(batch, k, dtype=torch.float32)  # moved to the input's device by forward
        if labels.is_floating_point():
            return labels.reshape(-1, k).to(torch.float32)
        labels = labels.long()
        null = labels == NULL_LABEL
        rows = F.one_hot(labels.clamp(min=0), k).to(torch.float32)
        return rows * (~null).to(torch.float32).unsqueeze(1) if null.any() else rows

    def forward(self, x_t, logsnr, cond=None):
        cond = as_cond(cond)
        x_t = x_t.to(torch.float64)
        b = x_t.shape[0]
        logsnr = torch.as_tensor(logsnr, dtype=torch.float64, device=x_t.device).reshape(-1)
        if logsnr.numel() == 1:
            logsnr = logsnr.expand(b)
        sigma = edm.sigma_from_logsnr(logsnr)
        view = (-1,) + (1,) * (x_t.ndim - 1)
        s = sigma.view(view)
        skip = edm.c_skip(s, self.sigma_data)
        out = edm.c_out(s, self.sigma_data)
        x_in = (edm.c_in(s, self.sigma_data) * x_t).to(torch.float32)
        noise = edm.c_noise(sigma).to(torch.float32)
        class_labels = self.class_labels(cond.labels, b)
        if class_labels is not None:
            class_labels = class_labels.to(x_t.device)
        run = getattr(self.net, "run", None)  # EDMNet: with any extra inputs (w) beside the label
        if run is not None:
            f = run(x_in, noise, class_labels, cond.extra)
        elif cond.extra:
            raise ConfigError(f"this EDM network takes no extra conditioning inputs, got {sorted(cond.extra)}")
        else:
            f = self.net.model(x_in, noise, class_labels)
        return skip * x_t + out * f.to(torch.float64)
