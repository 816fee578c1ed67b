"""The options of a run (gin: ``train.*``), declared once: their names, defaults and meaning.

:class:`Options` is the one list.  gin binds it under the name ``train``; the training loop receives
it resolved, and so does everything that rebuilds a finished run from its saved ``config.gin``
(:func:`tract_repro.config.rebuild`), so a default changed here changes training, evaluation and
export alike.  :meth:`Options.build_grid` and :meth:`Options.build_denoiser` are the one way a run's
time grid and network are made from its options.
"""
import dataclasses
from pathlib import Path

import gin

from tract_repro.common.errors import ConfigError
from tract_repro.diffusion.grid import TimeGrid
from tract_repro.diffusion.schedules import CosineSchedule
from tract_repro.networks.denoiser import build_denoiser
from tract_repro.training.optim import InferenceEMA, adam, learning_rate

#: options a job sets itself, never bound in gin
JOB_ONLY = ("workdir", "pace", "config_text")


@gin.configurable("train", denylist=list(JOB_ONLY))
@dataclasses.dataclass
class Options:
    """Everything a run is made of.

    ``method``, ``network`` (a network class or factory, called once) and ``dataset`` (a data-set factory)
    must be bound to train (:meth:`require` says which is missing); a finished run is rebuilt from its
    network and data alone.  The data are noised on a ``T``-step grid of ``schedule`` and the network predicts
    ``parameterisation`` (x, eps, v, both or edm).  ``teacher``: a teacher run directory or weights
    file, for methods that distil one.  ``batch_size`` is the global batch of a step, split over
    the processes of a data-parallel run and into ``accumulate`` micro-batches on each.  ``total``
    or ``phase_lengths`` give the samples of each phase; ``phase_reset`` lists what a phase boundary
    resets.  ``only_phase = p`` trains phase p alone, continuing from the final checkpoint of the
    run ``previous`` (phase p − 1).  ``inference_ema`` is μ_I (gin ``inference_ema_momentum.*``);
    ``extra_inference_emas`` (e.g. ``[{'residual': 1e-3}, {'momentum': 0.999}]``) tracks further
    inference EMAs beside it, so one phase serves runs that differ only in μ_I.  ``device``: a
    :class:`~tract_repro.training.device.Device` (made by the loop if None).  ``optimizer(parameters)``
    makes the optimiser and ``lr_schedule(base, samples, phase)`` gives each step's learning rate.
    Checkpoints every ``checkpoint_every`` samples (``keep_checkpoints`` kept), a metrics record every
    ``log_every`` samples (and to TensorBoard if ``tensorboard``), a sample grid every ``grid_every``
    samples and at each phase end (``grid_size`` samples, ``grid_scale``× enlarged, for students of
    at most ``grid_max_steps`` steps).  ``pace`` (set by the launcher for forked seeds) is told each
    step; ``config_text`` (the configuration as given) is written to ``config.gin``.
    """

    workdir: Path
    method: object = None
    network: object = None
    dataset: object = None
    schedule: object = CosineSchedule
    T: int = 1024
    parameterisation: str = "v"
    teacher: object = None
    batch_size: int = 128
    accumulate: int = 1
    total: object = None
    phase_lengths: object = None
    grad_clip: float = 1.0
    loss_reduction: str = "mean"
    phase_reset: tuple = ()
    seed: int = 0
    threads: int = 1
    checkpoint_every: object = "64K"
    keep_checkpoints: int = 2
    log_every: object = "8K"
    tensorboard: bool = True
    grid_every: object = None
    grid_size: int = 100
    grid_scale: int = 4
    grid_max_steps: int = 64
    only_phase: int = None
    previous: object = None
    inference_ema: InferenceEMA = None
    extra_inference_emas: tuple = ()
    device: object = None
    optimizer: object = adam
    lr_schedule: object = learning_rate
    pace: object = None
    config_text: str = None

    def __post_init__(self):
        self.workdir = None if self.workdir is None else Path(self.workdir)
        if self.inference_ema is None:  # the gin-bound μ_I (inference_ema_momentum.momentum or .residual)
            self.inference_ema = InferenceEMA()
        self.extra_inference_emas = extra_settings(self.extra_inference_emas, self.inference_ema)

    def require(self, *names):
        """One line naming the first of ``names`` (e.g. 'method', 'network') that is not bound, and how to bind it."""
        examples = dict(method="@TRACT()", network="@UNet", dataset="@digits")
        for name in names:
            if name == "inference_ema":
                self.inference_ema.check()
            elif getattr(self, name) is None:
                raise ConfigError(f"train.{name} is not bound: bind it in the run's gin file, e.g. "
                                  f"train.{name} = {examples.get(name, '...')}")
        return self

    def check(self):
        """One line for the first option a run cannot train with (before anything is written); returns self."""
        self.require("method", "network", "dataset", "inference_ema")
        for name in ("batch_size", "seed", "threads", "accumulate"):
            value, least = getattr(self, name), 0 if name == "seed" else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ConfigError(f"train.{name} = {value!r}: give a whole number, at least {least}")
        if self.loss_reduction not in ("mean", "sum"):
            raise ConfigError(f"train.loss_reduction = {self.loss_reduction!r}: choose 'mean' (over pixels) or 'sum' "
                              f"(official TRACT)")
        return self

    def build_grid(self):
        """The run's time grid: ``T`` steps of ``schedule``."""
        return TimeGrid(self.schedule(), self.T)

    def build_denoiser(self, schedule):
        """The student network, freshly initialised, behind the denoiser contract of ``parameterisation``."""
        self.require("network")
        return build_denoiser(self.network(), schedule, self.parameterisation)


def extra_settings(entries, own):
    """``train.extra_inference_emas`` as :class:`InferenceEMA` settings, each distinct and not the run's own."""
    settings = []
    for entry in entries:
        if not isinstance(entry, InferenceEMA):
            unknown = set(entry) - {"momentum", "residual"} if isinstance(entry, dict) else {"?"}
            if unknown:
                raise ConfigError(f"train.extra_inference_emas entry {entry!r} has {sorted(unknown)}: use "
                                  f"{{'momentum': m}} or {{'residual': r}}")
            entry = InferenceEMA(**entry).check()
        if entry in settings or entry == own:
            raise ConfigError(f"train.extra_inference_emas lists {entry.label} twice (or as the run's own μ_I): "
                              f"list each setting once")
        settings.append(entry)
    return tuple(settings)
