"""Device options: clear errors, CPU-drawn randomness, and (where a GPU exists) CUDA runs."""
import json

import gin
import pytest
import torch

from tests.conftest import tiny_gin
from tract_repro import config
from tract_repro.diffusion.grid import TimeGrid
from tract_repro.diffusion.schedules import CosineSchedule
from tract_repro.methods import TRACT
from tract_repro.methods.base import Networks
from tract_repro.methods.phases import plan_phases
from tract_repro.networks.denoiser import VPDenoiser
from tract_repro.networks.unet import UNet
from tract_repro.training.device import Device
from tract_repro.training.loop import train

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_asking_for_cuda_without_it_names_the_fix():
    with pytest.raises(ValueError, match="Device.name = 'cpu'"):
        Device("cuda")


def test_unknown_autocast_dtype_is_refused():
    with pytest.raises(ValueError, match="choose None, 'bf16' or 'fp16'"):
        Device("cpu", autocast="int8")


def tiny_student(channels_last=False):
    torch.manual_seed(0)
    net = UNet(in_channels=1, resolution=8, channels=8, emb_channels=16, channel_mult=(1, 2), num_res_blocks=1,
               attn_resolutions=(), norm_groups=4)
    return Device("cpu", channels_last=channels_last).prepare(VPDenoiser(net, CosineSchedule(), "v"))


def test_channels_last_gives_the_same_tract_target():
    grid = TimeGrid(CosineSchedule(), 64)
    method = TRACT(schedule=(64, 8, 1))
    phase = plan_phases(method.steps(64), total=1024)[0]
    x = torch.rand(16, 1, 8, 8, dtype=torch.float64) * 2 - 1
    targets = []
    for cl in (False, True):
        s = tiny_student(cl)
        targets.append(method(x, None, phase, Networks(s.eval(), s.eval()), grid, torch.Generator().manual_seed(3)))
    a, b = targets
    assert torch.equal(a.x_t, b.x_t) and torch.equal(a.logsnr, b.logsnr)
    torch.testing.assert_close(a.x_target, b.x_target, rtol=1e-5, atol=1e-5)


def run_tiny(tmp_path, name, device_lines):
    gin.clear_config()
    config.parse([], [], text=tiny_gin("train.method = @TeacherTraining()\nTeacherTraining.sample_steps = 8\n"
                                       "inference_ema_momentum.momentum = 0.9\ntrain.log_every = 16",
                                       total=256, extra=device_lines))
    run = train(tmp_path / name)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return run, records


@cuda
def test_cuda_run_matches_the_cpu_run_and_records_its_device(tmp_path):
    cpu, cpu_log = run_tiny(tmp_path, "cpu", "Device.name = 'cpu'")
    gpu, gpu_log = run_tiny(tmp_path, "gpu", "Device.name = 'cuda'")
    info = json.loads((gpu / "run.json").read_text())
    assert info["device"]["device"] == "cuda" and info["device"]["gpu"]
    # Same initial weights, data, t and ε (all drawn on the CPU): the first step's loss agrees to
    # float32 round-off; later steps drift apart only through Adam's amplification of round-off.
    assert cpu_log[0]["samples"] == gpu_log[0]["samples"] == 16
    assert gpu_log[0]["loss"] == pytest.approx(cpu_log[0]["loss"], rel=1e-4)
    a, b = torch.load(cpu / "ema.pt", weights_only=True), torch.load(gpu / "ema.pt", weights_only=True)
    assert a.keys() == b.keys() and all(b[k].device.type == "cpu" or b[k].is_cuda for k in b)


@cuda
def test_cuda_run_with_bf16_autocast_and_channels_last_trains(tmp_path):
    run, log = run_tiny(tmp_path, "bf16", "Device.name = 'cuda'\nDevice.tf32 = True\nDevice.autocast = 'bf16'\n"
                                          "Device.channels_last = True")
    info = json.loads((run / "run.json").read_text())
    assert info["device"] | dict(gpu=None) == dict(device="cuda", tf32=True, autocast="bf16", channels_last=True, noise="cpu", gpu=None)
    assert info["status"] == "complete" and len(log) == 16
    assert all(torch.isfinite(torch.tensor([r["loss"] for r in log])))
    weights = torch.load(run / "ema.pt", weights_only=True)
    assert all(torch.isfinite(v.float()).all() for v in weights.values())
