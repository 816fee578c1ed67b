"""Network heads turned into the x₀ estimate x̂ (method-spec §2).

Each function maps (x_t, out, α, σ) to x̂; α and σ broadcast against x_t.
"""
from tract_repro.common.errors import ConfigError


def x_from_x(x_t, out, alpha, sigma):
    """x̂ = out."""
    return out


def x_from_eps(x_t, out, alpha, sigma):
    """x̂ = (x_t − σ·ε̂)/α."""
    return (x_t - sigma * out) / alpha


def x_from_v(x_t, out, alpha, sigma):
    """x̂ = α·x_t − σ·v̂."""
    return alpha * x_t - sigma * out


def x_from_both(x_t, out, alpha, sigma):
    """x̂ = (1−γ)·x_head + γ·(x_t − σ·ε_head)/α, γ = α² (x-and-ε heads stacked on channels)."""
    x_head, eps_head = out.chunk(2, dim=1)
    gamma = alpha * alpha
    return (1 - gamma) * x_head + gamma * x_from_eps(x_t, eps_head, alpha, sigma)


def v_target(x, eps, alpha, sigma):
    """v = α·ε − σ·x, the quantity a v-head predicts."""
    return alpha * eps - sigma * x


PARAMETERISATIONS = {"x": x_from_x, "eps": x_from_eps, "v": x_from_v, "both": x_from_both}
OUTPUTS = {"x": 1, "eps": 1, "v": 1, "both": 2}


def get(name):
    """The x̂ function of a parameterisation, with a one-line error naming the choices."""
    try:
        return PARAMETERISATIONS[name]
    except KeyError:
        raise ConfigError(f"unknown parameterisation {name!r}: choose one of {sorted(PARAMETERISATIONS)}") from None
