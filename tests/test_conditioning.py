"""One Cond carries what a denoiser is conditioned on through methods and samplers: sliced with the
rows of a partial batch, and read only by the network (here a named extra input, as guidance's w will be)."""
import torch

from tract_repro.diffusion.grid import TimeGrid
from tract_repro.diffusion.schedules import CosineSchedule
from tract_repro.methods import TRACT
from tract_repro.methods.base import Networks
from tract_repro.methods.phases import plan_phases
from tract_repro.networks.conditioning import Cond, as_cond
from tract_repro.networks.denoiser import VPDenoiser
from tract_repro.networks.unet import UNet
from tract_repro.sampling import registry


def tiny(extra=()):
    torch.manual_seed(0)
    net = UNet(in_channels=1, resolution=8, channels=8, emb_channels=16, channel_mult=(1, 2), num_res_blocks=1,
               attn_resolutions=(), norm_groups=4, extra_conditions=extra)
    with torch.no_grad():  # away from the zero-initialised output layer, so that every input shows
        for param in net.parameters():
            param.normal_(0.0, 0.2)
    return VPDenoiser(net, CosineSchedule(), "v").eval()


def test_a_cond_slices_every_field_alike():
    cond = Cond(torch.arange(5), {"w": torch.linspace(0, 4, 5, dtype=torch.float64)})
    rows = torch.tensor([True, False, True, False, True])
    part = cond[rows]
    assert part.labels.tolist() == [0, 2, 4] and part.extra["w"].tolist() == [0.0, 2.0, 4.0]
    assert as_cond(None) == Cond() and as_cond(torch.tensor([3])).labels.tolist() == [3] and as_cond(part) is part


def test_an_extra_input_reaches_the_network_and_follows_the_rows():
    denoiser, g = tiny(("w",)), torch.Generator().manual_seed(1)
    x = torch.randn(4, 1, 8, 8, dtype=torch.float64, generator=g)
    logsnr = torch.linspace(-3, 3, 4, dtype=torch.float64)
    w = torch.tensor([0.0, 1.0, 2.0, 3.0], dtype=torch.float64)
    with torch.no_grad():
        whole = denoiser(x, logsnr, Cond(extra={"w": w}))
        other = denoiser(x, logsnr, Cond(extra={"w": w + 1}))
        part = denoiser(x[1:3], logsnr[1:3], Cond(extra={"w": w})[1:3])
    assert not torch.allclose(whole, other)  # w changes the prediction
    torch.testing.assert_close(part, whole[1:3], rtol=0, atol=1e-6)


def test_tract_and_the_samplers_pass_a_cond_through_unchanged():
    """A TRACT target with an extra input equals the one computed sample by sample (the self-teacher
    call on the unfinished rows gets those rows' conditioning), and the samplers accept the same Cond."""
    denoiser, grid = tiny(("w",)), TimeGrid(CosineSchedule(), 64)
    nets = Networks(teacher=denoiser, self_teacher=denoiser)
    method, phase = TRACT(schedule=(64, 8, 1)), plan_phases((64, 8, 1), total=64)[0]
    x = torch.rand(6, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) * 2 - 1
    cond = Cond(extra={"w": torch.arange(6, dtype=torch.float64)})
    whole = method(x, cond, phase, nets, grid, torch.Generator().manual_seed(3))
    for i in range(6):  # the same draws, one sample at a time: draw all six, keep row i
        from tract_repro.common.batch_random import StepRandom

        one = method(x[i:i + 1], cond[i:i + 1], phase, nets, grid,
                     StepRandom(torch.Generator().manual_seed(3), 6).slice(i, i + 1))
        torch.testing.assert_close(one.x_target, whole.x_target[i:i + 1], rtol=0, atol=1e-6)
        assert one.cond.extra["w"].item() == i
    noise = torch.randn(6, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    a = registry.sample("ddim", denoiser, grid, 4, noise, cond)
    b = registry.sample("ddim", denoiser, grid, 4, noise, Cond(extra={"w": cond.extra["w"] + 1}))
    assert torch.isfinite(a).all() and not torch.allclose(a, b)
