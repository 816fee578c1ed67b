"""Noise schedules: log-SNR as a function of continuous time u ∈ [0, 1] and its T-grid.

A schedule knows its *process* (VP or VE), which maps a log-SNR λ to (α, σ) with
x_t = α·x + σ·ε.  Every sampler, method and loss talks in λ, so VP and VE teachers
share one denoiser contract D(x_t, λ, cond) (method-spec §1, §6).
"""
import json
import math
from pathlib import Path

import gin
import numpy as np
import torch
from torch.nn import functional as F

from tract_repro.common.errors import ConfigError


def vp_alpha_sigma(logsnr):
    """VP: α² = sigmoid(λ), σ² = sigmoid(−λ) (method-spec §1)."""
    return torch.sigmoid(logsnr).sqrt(), torch.sigmoid(-logsnr).sqrt()


def ve_alpha_sigma(logsnr):
    """VE: α = 1, σ = exp(−λ/2), so λ = −2·ln σ (method-spec §6)."""
    return torch.ones_like(logsnr), torch.exp(-0.5 * logsnr)


PROCESSES = {"vp": vp_alpha_sigma, "ve": ve_alpha_sigma}


@gin.configurable
class CosineSchedule:
    """VP cosine log-SNR: λ(u) = −2·log tan(a·u + b), b = atan(e^{−λmax/2}), a = atan(e^{−λmin/2}) − b."""

    process = "vp"

    def __init__(self, logsnr_min=-20.0, logsnr_max=20.0):
        if not logsnr_min < logsnr_max:
            raise ConfigError(f"CosineSchedule needs logsnr_min < logsnr_max, got {logsnr_min}, {logsnr_max}")
        self.b = math.atan(math.exp(-0.5 * logsnr_max))
        self.a = math.atan(math.exp(-0.5 * logsnr_min)) - self.b

    def logsnr(self, u):
        """λ(u) for continuous time u ∈ [0, 1] (float64 recommended)."""
        return -2.0 * torch.log(torch.tan(self.a * u + self.b))

    def grid(self, T):
        """λ_i = λ(i/T) for i = 0..T, float64 (index 0 is the clean end)."""
        return self.logsnr(torch.arange(T + 1, dtype=torch.float64) / T)

    def alpha_sigma(self, logsnr):
        return vp_alpha_sigma(logsnr)


#: the β schedules of diffusers' schedulers that :class:`DiscreteSchedule` computes
BETA_SCHEDULES = ("scaled_linear", "linear", "squaredcos_cap_v2")


def discrete_betas(beta_schedule, beta_start, beta_end, N):
    """β_n for n = 0..N−1 in float64, by diffusers' definitions: linear β = linspace(β₀, β₁),
    scaled_linear β = linspace(√β₀, √β₁)², squaredcos_cap_v2 β_n = min(1 − ᾱ_c((n+1)/N)/ᾱ_c(n/N), 0.999)
    with ᾱ_c(t) = cos²((t + 0.008)/1.008 · π/2) (Nichol & Dhariwal's cosine)."""
    if beta_schedule == "linear":
        return torch.linspace(beta_start, beta_end, N, dtype=torch.float64)
    if beta_schedule == "scaled_linear":
        return torch.linspace(beta_start ** 0.5, beta_end ** 0.5, N, dtype=torch.float64) ** 2
    if beta_schedule == "squaredcos_cap_v2":
        def bar(t):
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
        return torch.tensor([min(1 - bar((n + 1) / N) / bar(n / N), 0.999) for n in range(N)], dtype=torch.float64)
    raise ConfigError(f"DiscreteSchedule.beta_schedule = {beta_schedule!r}: choose one of {', '.join(BETA_SCHEDULES)}")


def logsnr_from_log_alpha_bar(log_alpha_bar):
    """λ = log ᾱ − log(1 − ᾱ), from log ᾱ (+∞ where ᾱ = 1)."""
    return log_alpha_bar - torch.log(-torch.expm1(log_alpha_bar))


@gin.configurable
class DiscreteSchedule:
    """A diffusers teacher's own discrete VP schedule: ᾱ_n = ∏_{m ≤ n} (1 − β_m), n = 0..N−1, in continuous time.

    u ∈ [0, 1] is the fractional timestep τ = N·u − 1 ∈ [−1, N − 1]; log ᾱ is interpolated linearly in τ between
    the trained timesteps, with ᾱ(−1) = 1 (the clean end, λ = +∞: α = 1, σ = 0, so a DDIM step to grid index 0
    returns x̂ exactly).  λ(τ) = log ᾱ(τ) − log(1 − ᾱ(τ)); :meth:`timestep` inverts it, and is what a diffusers
    network is fed.  ``grid(T)`` puts grid index i at τ_i = round(N·i/T) − 1 (numpy's round half to even), so a
    K-step sampler on the T-grid visits exactly the integer timesteps of diffusers'
    ``DDIMScheduler(timestep_spacing="trailing").set_timesteps(K)``; T > N is refused.

    The noisy end is not pure noise: ᾱ at τ = N − 1 is not 0 (Stable Diffusion's scaled_linear, β from 0.00085
    to 0.012: ᾱ_999 = 0.004660, λ = −5.364).  Like diffusers, the samplers start from noise alone at that level,
    the last trained timestep (they draw σ_{N−1}·ε, σ_{N−1} = 0.99767 for SD, where diffusers draws ε itself).
    """

    process = "vp"

    def __init__(self, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000):
        N = num_train_timesteps
        if isinstance(N, bool) or not isinstance(N, int) or N < 1:
            raise ConfigError(f"DiscreteSchedule.num_train_timesteps = {N!r}: give a whole number, e.g. 1000")
        betas = discrete_betas(beta_schedule, float(beta_start), float(beta_end), N)
        if not bool(((betas > 0) & (betas < 1)).all()):
            raise ConfigError(f"DiscreteSchedule needs 0 < β < 1 at every timestep, got beta_start = {beta_start}, "
                              f"beta_end = {beta_end}: use values such as 0.00085 and 0.012")
        self.beta_schedule, self.beta_start, self.beta_end, self.N = beta_schedule, float(beta_start), float(beta_end), N
        self.betas = betas
        # log ᾱ at τ = −1, 0, …, N − 1 (entry j is τ = j − 1), and λ there
        self.log_alpha_bar = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(torch.log1p(-betas), 0)])
        self.table = logsnr_from_log_alpha_bar(self.log_alpha_bar)
        self._on = {}

    @property
    def alphas_cumprod(self):
        """ᾱ_n for the trained timesteps n = 0..N−1 (float64)."""
        return self.log_alpha_bar[1:].exp()

    def __eq__(self, other):
        return isinstance(other, DiscreteSchedule) and self.key() == other.key()

    def __hash__(self):
        return hash(self.key())

    def key(self):
        return self.beta_schedule, self.beta_start, self.beta_end, self.N

    def __repr__(self):
        return (f"DiscreteSchedule({self.beta_schedule!r}, beta_start={self.beta_start}, beta_end={self.beta_end}, "
                f"num_train_timesteps={self.N})")

    def _tables(self, device):
        """(log ᾱ, λ) tables on ``device``."""
        key = str(device)
        if key not in self._on:
            self._on[key] = self.log_alpha_bar.to(device), self.table.to(device)
        return self._on[key]

    def logsnr(self, u):
        """λ(u): log ᾱ interpolated linearly at j = τ + 1 = N·u ∈ [0, N] (exact table values at whole j)."""
        log_ab, table = self._tables(u.device)
        j = (u.to(torch.float64) * self.N).clamp(0, self.N)
        k = j.floor().long().clamp(max=self.N - 1)
        between = logsnr_from_log_alpha_bar(torch.lerp(log_ab[k], log_ab[k + 1], j - k))
        whole = j == j.floor()
        return torch.where(whole, table[j.long().clamp(0, self.N)], between)

    def grid(self, T):
        """λ_i at τ_i = round(N·i/T) − 1 for i = 0..T (index 0 is the clean end, λ_0 = +∞), float64."""
        if int(T) != T or T < 1:
            raise ConfigError(f"the time grid needs a positive integer T, got {T!r}")
        if T > self.N:
            raise ConfigError(f"train.T = {T} is finer than the teacher's {self.N} trained timesteps: "
                              f"use T ≤ N, e.g. 512 as Meng et al.")
        j = np.round(self.N * np.arange(int(T) + 1) / int(T)).astype(np.int64)
        return self.table[torch.from_numpy(j)]

    def timestep(self, logsnr):
        """The fractional timestep τ ∈ [−1, N − 1] with λ(τ) = λ: the inverse of the interpolation (exact at the
        trained timesteps; λ below λ(N − 1) gives N − 1).  float64, on λ's device."""
        log_ab, table = self._tables(logsnr.device)
        logsnr = logsnr.to(torch.float64)
        # table is decreasing in j: the first j with table[j] ≤ λ
        j = torch.searchsorted(-table, -logsnr.contiguous()).clamp(max=self.N)
        hit = table[j] == logsnr
        k = (j - 1).clamp(min=0)
        frac = (F.logsigmoid(logsnr) - log_ab[k]) / (log_ab[k + 1] - log_ab[k])
        tau = torch.where(hit | (j == 0), j.to(torch.float64), k + frac.clamp(0.0, 1.0)) - 1.0
        return tau

    def alpha_sigma(self, logsnr):
        return vp_alpha_sigma(logsnr)

    @classmethod
    def from_diffusers_config(cls, folder):
        """The schedule of a diffusers scheduler config (a diffusers folder, its scheduler/ or the JSON file)."""
        return cls(**diffusers_schedule_arguments(folder))


@gin.configurable
def diffusers_schedule(folder=gin.REQUIRED):
    """The :class:`DiscreteSchedule` of a diffusers folder's ``scheduler/scheduler_config.json`` (or that file)."""
    return DiscreteSchedule.from_diffusers_config(folder)


def scheduler_config_path(folder):
    """The scheduler config of a diffusers folder (its scheduler/scheduler_config.json), its scheduler/, or the file."""
    path = Path(folder)
    for candidate in (path / "scheduler" / "scheduler_config.json", path / "scheduler_config.json", path):
        if candidate.is_file():
            return candidate
    raise ConfigError(f"no diffusers scheduler config at {folder}: fetch the model's scheduler/scheduler_config.json "
                      f"into {path / 'scheduler'} (a diffusers folder has it)")


def diffusers_schedule_arguments(folder):
    """:class:`DiscreteSchedule`'s arguments from a diffusers scheduler config; one line for what it cannot represent."""
    path = scheduler_config_path(folder)
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read the scheduler config {path}: {exc}") from None
    if config.get("trained_betas") is not None:
        raise ConfigError(f"{path} lists trained_betas: DiscreteSchedule computes β from beta_schedule; "
                          f"use a scheduler config with beta_schedule in {', '.join(BETA_SCHEDULES)}")
    if config.get("rescale_betas_zero_snr"):
        raise ConfigError(f"{path} rescales β to zero terminal SNR, which DiscreteSchedule does not: "
                          f"use a model trained without rescale_betas_zero_snr")
    beta_schedule = config.get("beta_schedule", "linear")
    if beta_schedule not in BETA_SCHEDULES:
        raise ConfigError(f"{path}: beta_schedule = {beta_schedule!r} is not one of {', '.join(BETA_SCHEDULES)}")
    return dict(beta_schedule=beta_schedule, beta_start=config.get("beta_start", 0.0001),
                beta_end=config.get("beta_end", 0.02), num_train_timesteps=int(config.get("num_train_timesteps", 1000)))
