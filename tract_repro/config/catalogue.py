"""The catalogue: importing this module registers every configurable a gin file may bind.

Evaluation's own configurables (``inception_extractor``, ``train_classifier``) are registered by
the evaluation modules that parse configurations binding them.
"""
import gin

import tract_repro.data.autoencoder  # noqa: F401  (train_vae.*, vae_architecture.*: python -m tract_repro.train_vae)
import tract_repro.data.cifar10  # noqa: F401
import tract_repro.data.digits  # noqa: F401
import tract_repro.data.imagenet64  # noqa: F401
import tract_repro.data.latents  # noqa: F401  (latents(folder): encoded latent shards, python -m tract_repro.encode_latents)
import tract_repro.diffusion.edm  # noqa: F401
import tract_repro.methods  # noqa: F401
import tract_repro.networks.diffusers_net  # noqa: F401  (diffusers_network; diffusers itself is imported when called)
import tract_repro.networks.edm_unets  # noqa: F401
import tract_repro.networks.unet  # noqa: F401
import tract_repro.training.loop  # noqa: F401
import tract_repro.training.options  # noqa: F401  (train.*)
import tract_repro.training.teacher  # noqa: F401
import tract_repro.config.executors  # noqa: F401  (slurm.*, local_executor.*: may appear in any config)
from tract_repro.sampling.heun import heun_sampler, heun_teacher_step
from tract_repro.sampling.steps import ddim_teacher_step

for _fn in (ddim_teacher_step, heun_teacher_step, heun_sampler):  # so gin files can say TRACT.teacher_step = @heun_teacher_step
    gin.external_configurable(_fn)
