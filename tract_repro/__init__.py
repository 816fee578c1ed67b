"""tract-repro: a config-driven reproduction suite for diffusion time distillation (TRACT, BTD).

Folders follow the architecture: ``diffusion`` (maths), ``networks``, ``methods`` (target
functions), ``training`` (the one loop), ``sampling``, ``data`` and ``launch``.
"""

import os

# Let idle OpenMP threads sleep instead of spinning: with two or more torch threads, spinning
# threads slow a run several-fold as soon as any other process wants a core (measured: a
# 2-thread digits teacher fell from 510 to 60-120 samples/s beside one busy process).  Must be
# set before torch loads OpenMP; an explicit OMP_WAIT_POLICY in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
