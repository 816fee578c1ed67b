"""The files an export ships beside its weights, copied as they are (``python -m tract_repro.export --format diffusers``).

``pipeline.py`` (the :class:`TractPipeline` with the student's K-step DDIM loop), ``tract_unet.py`` (our UNet as a
diffusers model component) and ``scheduling_tract.py`` (the time grid as a diffusers scheduler config).  diffusers
loads them from the exported folder with ``trust_remote_code=True``; nothing in ``tract_repro`` imports them except
the exporter, which uses their classes to write the components' configurations.
"""
