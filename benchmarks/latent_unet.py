"""FLOPs, throughput and peak memory of a Stable Diffusion-sized UNet step behind the project's adapter.

    python benchmarks/latent_unet.py                       # FLOPs (meta device) and, on a GPU, timed steps
    python benchmarks/latent_unet.py --batch 16 --checkpointing --steps 10
    python benchmarks/latent_unet.py --skip-timing         # FLOPs and the estimate only (seconds, no GPU needed)
    python benchmarks/latent_unet.py --device cpu --batch 1 --steps 1   # the CPU path: minutes per step, ~14 GB

The network is diffusers' ``UNet2DConditionModel`` built from Stable Diffusion 1.5's UNet configuration
(859.5M parameters; random weights: speed does not depend on them) on 64×64×4 latents with a 77-token,
768-wide text context, wrapped by ``tract_repro.networks.diffusers_net`` exactly as a training run wraps it.

FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` on the meta device (no memory, no
weights), per sample: one forward pass (a teacher or self-teacher evaluation) and one forward plus backward
(the student's update).  A distillation step of BTD costs two teacher passes and the student's update, TRACT
one teacher pass, one self-teacher pass and the update; both are printed, and with classifier-free guidance
each teacher pass is on a doubled batch.

On a GPU the step is timed (bf16 autocast with float32 master weights, SDPA attention, optionally diffusers'
gradient checkpointing; Adam): samples/s of the student's update and of a BTD step (two no-grad teacher
passes of the same network, then the update), and the peak allocated memory.  Without a GPU the script
prints an estimate from the FLOP count and an assumed model-FLOP utilisation (``--mfu``, default 0.4) of a
dense bf16 peak (``--peak-tflops``, default 989: an H100 SXM), marked as an estimate.
"""
import argparse
import time

import torch

SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280),
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                 cross_attention_dim=768, attention_head_dim=8)
TOKENS, WIDTH = 77, 768


def build(device):
    """The adapter around an SD 1.5-sized UNet, on ``device`` (meta: shapes only), and its schedule."""
    from diffusers import UNet2DConditionModel

    from tract_repro.diffusion.schedules import DiscreteSchedule
    from tract_repro.networks.diffusers_net import DiffusersNet

    schedule = DiscreteSchedule(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    with torch.device(device):
        net = DiffusersNet(UNet2DConditionModel(**SD15_UNET), schedule, torch.zeros(1, TOKENS, WIDTH))
    return net, schedule


def inputs(batch, device):
    from tract_repro.common.conditioning import Cond

    x = torch.randn(batch, 4, 64, 64, device=device)
    logsnr = torch.full((batch,), 0.5, device=device, dtype=torch.float64)
    cond = Cond(torch.zeros(batch, dtype=torch.long, device=device), {"text": torch.randn(batch, TOKENS, WIDTH, device=device)})
    return x, logsnr, cond


def flops_per_sample():
    """(forward, forward + backward) FLOPs of one sample, counted on the meta device."""
    from torch.utils.flop_counter import FlopCounterMode

    net, _ = build("meta")
    x, logsnr, cond = inputs(1, "meta")
    with FlopCounterMode(display=False) as counter:
        net(x, logsnr, cond.labels, cond.extra)
    forward = counter.get_total_flops()
    with FlopCounterMode(display=False) as counter:
        net(x, logsnr, cond.labels, cond.extra).float().square().mean().backward()
    return forward, counter.get_total_flops(), sum(p.numel() for p in net.parameters())


def timed(args):
    """samples/s of the update and of a BTD step, and the peak memory, on ``args.device``."""
    net, _ = build(args.device)
    if args.checkpointing:
        net.model.enable_gradient_checkpointing()
    opt = torch.optim.Adam(net.parameters(), lr=1e-5)
    x, logsnr, cond = inputs(args.batch, args.device)
    autocast = torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.device == "cuda")

    def update():
        with autocast:
            loss = net(x, logsnr, cond.labels, cond.extra).float().square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def btd_step():
        with torch.no_grad(), autocast:
            for _ in range(2):
                net(x, logsnr, cond.labels, cond.extra)
        update()

    rows = {}
    for name, fn in (("update", update), ("btd step", btd_step)):
        fn()  # warm-up
        if args.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        for _ in range(args.steps):
            fn()
        if args.device == "cuda":
            torch.cuda.synchronize()
        seconds = (time.perf_counter() - start) / args.steps
        peak = torch.cuda.max_memory_allocated() / 2**30 if args.device == "cuda" else float("nan")
        rows[name] = (args.batch / seconds, seconds, peak)
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--checkpointing", action="store_true", help="diffusers' gradient checkpointing")
    p.add_argument("--mfu", type=float, default=0.4, help="assumed utilisation for the estimate without a GPU")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak for the estimate (H100 SXM)")
    p.add_argument("--skip-timing", action="store_true", help="FLOPs and the estimate only")
    args = p.parse_args()

    forward, update, params = flops_per_sample()
    btd, guided_btd = 2 * forward + update, 4 * forward + update
    print(f"SD 1.5-sized UNet: {params / 1e6:.1f}M parameters, 64x64x4 latents, {TOKENS}x{WIDTH} text context")
    print(f"GFLOP per sample: forward {forward / 1e9:.0f}, forward+backward {update / 1e9:.0f}, "
          f"BTD/TRACT step {btd / 1e9:.0f} (guided stage 2, teacher passes on a doubled batch: {guided_btd / 1e9:.0f})")
    rate = args.mfu * args.peak_tflops * 1e12
    print(f"ESTIMATE (not measured): at {args.mfu:.0%} of {args.peak_tflops:.0f} TFLOP/s, "
          f"{rate / btd:.0f} samples/s for a BTD/TRACT step, {rate / guided_btd:.0f} for a guided one, "
          f"{rate / update:.0f} for the v fine-tune's update")
    if args.skip_timing:
        return
    print(f"measured on {args.device} (batch {args.batch}, {args.steps} steps, "
          f"{'bf16 autocast' if args.device == 'cuda' else 'float32'}, checkpointing {'on' if args.checkpointing else 'off'}):")
    for name, (per_s, seconds, peak) in timed(args).items():
        print(f"  {name:9s} {per_s:8.2f} samples/s  {seconds * 1e3:9.1f} ms/step  peak {peak:.2f} GiB")


if __name__ == "__main__":
    main()
