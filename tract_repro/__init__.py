"""tract-repro: a config-driven reproduction suite for diffusion time distillation (TRACT, BTD).

Folders follow the architecture: ``diffusion`` (maths), ``networks``, ``methods`` (target
functions), ``training`` (the one loop), ``sampling``, ``data`` and ``launch``.
"""

__version__ = "0.1.0"
