"""tract-repro: a config-driven reproduction suite for diffusion time distillation (TRACT, BTD, guided).

Each folder is one layer, lowest first (docs/architecture.md; tests/test_architecture.py keeps it so):
``common``, ``diffusion`` (the maths), ``data``, ``networks`` (the denoiser contract), ``sampling``,
``methods`` (target functions), ``training`` (the run options and the one loop), ``config`` (gin),
``launching`` (executors), ``evaluation``, ``results`` (tables and the DVC pipeline) and
``exporting``; the commands ``launch``, ``evaluate``, ``warm``, ``import_teacher`` and ``export`` sit on top.
"""

import os

# Let idle OpenMP threads sleep instead of spinning: with two or more torch threads, spinning
# threads slow a run several-fold as soon as any other process wants a core (measured: a
# 2-thread digits teacher fell from 510 to 60-120 samples/s beside one busy process).  Must be
# set before torch loads OpenMP; an explicit OMP_WAIT_POLICY in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
