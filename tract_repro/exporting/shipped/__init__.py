"""The files an export ships beside its weights, copied as they are (``python -m tract_repro.export --format diffusers``).

``pipeline.py`` (the :class:`TractPipeline` with the student's K-step DDIM loop), ``tract_unet.py`` (our UNet as a
diffusers model component), ``scheduling_tract.py`` (the time grid as a diffusers scheduler config) and
``latent_class_pipeline.py`` (shipped as ``pipeline.py`` beside a class-conditional latent model's stock UNet, VAE
and DDIMScheduler, since no stock pipeline takes class labels for a UNet2DConditionModel).  diffusers
loads them from the exported folder with ``trust_remote_code=True``; nothing in ``tract_repro`` imports them except
the exporter, which uses their classes to write the components' configurations.
"""
