"""Methods are target functions on one shared loop: teacher training, BTD, TRACT and guided distillation.

A method maps a data batch to a :class:`~tract_repro.methods.base.Target` (x_t, λ, x̃,
weight); the training loop does the rest.
"""
from tract_repro.methods.base import Target  # noqa: F401
from tract_repro.methods.btd import BTD  # noqa: F401
from tract_repro.methods.diffusion_loss import TeacherTraining  # noqa: F401
from tract_repro.methods.guidance import GuidedDistillation  # noqa: F401
from tract_repro.methods.tract import TRACT  # noqa: F401
