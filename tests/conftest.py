import os

import gin
import pytest

os.environ.setdefault("TQDM_DISABLE", "1")

TINY_NET = """
UNet.in_channels = 1
UNet.resolution = 8
UNet.channels = 8
UNet.emb_channels = 16
UNet.channel_mult = (1, 2)
UNet.num_res_blocks = 1
UNet.attn_resolutions = ()
UNet.norm_groups = 4
"""
TINY_NET_ARGS = dict(in_channels=1, resolution=8, channels=8, emb_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                     attn_resolutions=(), norm_groups=4)  # TINY_NET as keyword arguments


def random_teacher(tmp_path_factory, net=TINY_NET_ARGS):
    """A randomly initialised tiny v-teacher saved as teacher.pt (distillation does not care that it is untrained)."""
    import torch

    from tract_repro.diffusion.schedules import CosineSchedule
    from tract_repro.networks.denoiser import build_denoiser
    from tract_repro.networks.unet import UNet

    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("teacher") / "teacher.pt"
    torch.save(build_denoiser(UNet(**net), CosineSchedule(), "v").state_dict(), path)
    return path


def tiny_gin(method_lines, *, total=1024, T=64, extra=""):
    """A complete tiny run configuration (digits data, 8-channel UNet, T = 64, batch 16)."""
    return f"""
train.dataset = @digits
train.network = @UNet
train.T = {T}
train.parameterisation = 'v'
train.batch_size = 16
train.total = {total}
train.threads = 1
train.log_every = 64
train.checkpoint_every = 256
train.grid_size = 4
train.grid_max_steps = 8
adam.lr = 1e-3
{TINY_NET}
{method_lines}
{extra}
"""


@pytest.fixture(autouse=True)
def clean_gin():
    gin.clear_config()
    yield
    gin.clear_config()


def bitwise_equal(x, y):
    """Whether two checkpoint values (nested dicts, lists, tensors, numbers) are bit-for-bit the same."""
    import torch

    if isinstance(x, dict):
        return isinstance(y, dict) and x.keys() == y.keys() and all(bitwise_equal(x[k], y[k]) for k in x)
    if isinstance(x, (list, tuple)):
        return len(x) == len(y) and all(bitwise_equal(u, v) for u, v in zip(x, y))
    return torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y
