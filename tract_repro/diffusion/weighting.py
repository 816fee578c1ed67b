"""Loss weightings w(λ) applied to the x-space error ‖x̂ − x‖² (method-spec §2)."""
import torch

from tract_repro.common.errors import ConfigError


def snr(logsnr):
    """w = SNR = α²/σ² = e^λ (the ε-MSE)."""
    return torch.exp(logsnr)


def truncated_snr(logsnr):
    """w = max(SNR, 1) (max of the x- and ε-MSE; TRACT and BTD)."""
    return torch.clamp(torch.exp(logsnr), min=1.0)


def snr_plus_one(logsnr):
    """w = SNR + 1 (the v-MSE)."""
    return torch.exp(logsnr) + 1.0


def edm(logsnr, sigma_data=0.5):
    """w = λ(σ) = (σ² + σ_d²)/(σ·σ_d)² = e^λ + 1/σ_d² for VE (α = 1): EDM's loss, i.e. the F-space MSE."""
    return torch.exp(logsnr) + 1.0 / sigma_data**2


WEIGHTINGS = {"snr": snr, "truncated_snr": truncated_snr, "snr+1": snr_plus_one, "edm": edm}


def get(name):
    """The weighting function called ``name``, with a one-line error naming the choices."""
    try:
        return WEIGHTINGS[name]
    except KeyError:
        raise ConfigError(f"unknown loss weighting {name!r}: choose one of {sorted(WEIGHTINGS)}") from None
