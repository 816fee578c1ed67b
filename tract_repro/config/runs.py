"""A run's configuration, resolved: its :class:`~tract_repro.training.options.Options` from gin, and the one
function that rebuilds a run's network, grid and data from its saved ``config.gin``.

Training, evaluation, import and export all take these objects; none of them reads gin or re-types a
default of ``train.*``.
"""
from dataclasses import dataclass

import gin

from tract_repro.config import parse
from tract_repro.training.options import Options


def resolved_options(workdir=None):
    """The :class:`Options` of the configuration parsed now: every ``train.*`` binding, the rest at its default.

    ``device`` is left None (a binding such as ``train.device = @Device()`` with ``Device.name = 'cuda'`` is not
    made): whoever reads a run's options, to evaluate or export it, runs wherever it is.
    """
    with gin.unlock_config():
        gin.bind_parameter("train.device", None)
    return Options(workdir=workdir)


@dataclass
class Rebuilt:
    """A run as its configuration makes it: options, denoiser (freshly initialised), time grid and data (or None)."""

    options: Options
    denoiser: object
    grid: object
    data: object


def rebuild(config_text, workdir=None, with_data=True):
    """Parse ``config_text`` (a run's ``config.gin``) and build its denoiser, grid and, if asked, data set.

    Everything is built while the text is the parsed configuration, so the network gets the run's own
    bindings; the configuration stays parsed afterwards.
    """
    parse(text=config_text)
    options = resolved_options(workdir)
    grid = options.build_grid()
    denoiser = options.build_denoiser(grid.schedule)
    return Rebuilt(options, denoiser, grid, options.require("dataset").dataset() if with_data else None)
