"""gin chooses the teacher source: a Google PD Flax checkpoint distils through the same launcher."""
import torch

from tests.conftest import tiny_gin
from tests.test_google_pd import TINY, to_flax
from tract_repro import launch
from tract_repro.networks.google_pd import write_flax_msgpack
from tract_repro.networks.unet import UNet

NET = dict(TINY, in_channels=1, num_classes=10)  # digits: 1 channel, 10 classes, x-and-ε heads


def test_distillation_starts_from_an_imported_flax_teacher(tmp_path):
    torch.manual_seed(3)
    unet = UNet(**NET)
    with torch.no_grad():
        for p in unet.parameters():
            p.normal_(0, 0.05)
    state = {k: v.clone() for k, v in unet.state_dict().items()}
    heads = {name: m.heads for name, m in unet.named_modules() if hasattr(m, "qkv")}
    write_flax_msgpack(tmp_path / "cifar_original", {"ema_params": to_flax(state, heads)})

    net_bindings = "\n".join(f"UNet.{k} = {v!r}" for k, v in NET.items())
    text = tiny_gin(f"train.method = @TRACT()\nTRACT.schedule = (64, 8, 1)\ntrain.teacher = '{tmp_path / 'cifar_original'}'\n"
                    "inference_ema_momentum.residual = 1e-3\ntrain.parameterisation = 'both'\nadam.lr = 0.0",
                    total=64, extra=net_bindings)
    (tmp_path / "run.gin").write_text(text)
    assert launch.main([str(tmp_path / "run.gin"), "--workdir", str(tmp_path / "run")]) == 0
    final = torch.load(tmp_path / "run" / "ema.pt", weights_only=True)
    assert all(torch.equal(final[f"net.{k}"], v) for k, v in state.items())  # lr 0: the imported weights, bit for bit
