#!/usr/bin/env bash
# One prepared device-machine check (issue "GPU throughput"): the CUDA tests, then the training loop's
# own steps (Run.step + Run.after_step, built from the run files in gin/; benchmarks/run_step.py) at
# paper scale and at digits scale, today's options (tf32+bf16) against every GPU-path option (noise on
# the device, float32 targets, compiled networks), interleaved case by case.  Each row also has the
# step's network passes alone and the per-step overhead (step − passes).  Run from the repository
# root, e.g. through the device tool:
#   bash benchmarks/gpu_session.sh            (rows also go to $OUT/gpu*.json when OUT is set)
set -u
python -m pip install -q -e '.[test]' >/dev/null 2>&1 || true
python -m pytest -q tests/test_device.py tests/test_benchmarks.py 2>&1 | tail -3
OPTS="tf32+bf16 tf32+bf16+fast tf32+bf16+fast+compile tf32+bf16 tf32+bf16+fast"
python benchmarks/gpu.py --steps 5 --repeats 3 --only cifar10_tract cifar10_btd edm_cifar10_tract \
    --options $OPTS ${OUT:+--json "$OUT/gpu.json"}
# digits scale: launch-bound, so fp32 too, and longer blocks
python benchmarks/gpu.py --steps 20 --repeats 3 --only digits_teacher digits_tract --options fp32 $OPTS \
    ${OUT:+--json "$OUT/gpu_digits.json"}
python benchmarks/gpu.py --steps 5 --repeats 2 --only imagenet64_tract --batch 64 --options tf32+bf16 tf32+bf16+fast \
    ${OUT:+--json "$OUT/gpu_imagenet64.json"}
# a Stable Diffusion-sized UNet step behind the adapter (bf16 autocast, SDPA), with and without diffusers' checkpointing
python benchmarks/latent_unet.py --batch 16 --steps 5 2>&1 | tail -4
python benchmarks/latent_unet.py --batch 32 --steps 5 --checkpointing 2>&1 | tail -3
