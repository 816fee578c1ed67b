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
    assert info["device"] | dict(gpu=None) == dict(device="cuda", tf32=True, autocast="bf16", channels_last=True, noise="cpu", compile=False, precision="float64", gpu=None)
    assert info["status"] == "complete" and len(log) == 16
    assert all(torch.isfinite(torch.tensor([r["loss"] for r in log])))
    weights = torch.load(run / "ema.pt", weights_only=True)
    assert all(torch.isfinite(v.float()).all() for v in weights.values())


def test_a_compiled_run_trains_like_the_eager_one_with_the_same_checkpoint_keys(tmp_path):
    """Device.compile compiles the student's, the teacher's and the self-teacher's networks in place (here with the
    aot_eager backend: TorchDynamo's graphs and AOT autograd without inductor's C++ code generation, which takes
    minutes on this CPU): the same losses to float tolerance, and checkpoints with the eager run's keys."""
    from tests.conftest import tiny_gin
    from tract_repro import config
    from tract_repro.training import checkpoint as ckpt
    from tract_repro.training.loop import train

    text = tiny_gin("train.method = @TeacherTraining()\nDevice.name = 'cpu'\ninference_ema_momentum.momentum = 0.9", total=64,
                    extra="train.log_every = 16\ntrain.checkpoint_every = 64\ntrain.grid_every = None")
    from torch._dynamo.utils import counters

    runs = {}
    for compiled in (False, True):
        counters.clear()
        config.parse([], [], text=text + ("\nDevice.compile = 'aot_eager'" if compiled else ""))
        runs[compiled] = train(tmp_path / str(compiled))
        assert (counters["stats"]["unique_graphs"] > 0) == compiled  # TorchDynamo captured the networks' graphs
    eager, compiled = (json.loads((runs[k] / "run.json").read_text()) for k in (False, True))
    assert compiled["device"]["compile"] == "aot_eager" and eager["device"]["compile"] is False
    losses = [[json.loads(l)["loss"] for l in (runs[k] / "metrics.jsonl").read_text().splitlines()] for k in (False, True)]
    assert len(losses[0]) == 4 and losses[1] == pytest.approx(losses[0], rel=1e-4)
    a, b = (ckpt.load(ckpt.list_checkpoints(runs[k] / "checkpoints")[-1]) for k in (False, True))
    assert a["student"].keys() == b["student"].keys()
    for name, value in a["student"].items():
        torch.testing.assert_close(b["student"][name], value, rtol=1e-3, atol=1e-5)


def test_a_float32_target_run_trains_like_the_float64_one(tmp_path):
    """Device.precision = 'float32': data, x_t and targets in float32 on the device; the losses follow the float64
    run's to float32 tolerance (same draws), and run.json says which precision was used."""
    from tests.conftest import tiny_gin
    from tract_repro import config
    from tract_repro.training.loop import train

    text = tiny_gin("train.method = @TeacherTraining()\nDevice.name = 'cpu'\ninference_ema_momentum.momentum = 0.9",
                    total=64, extra="train.log_every = 16\ntrain.checkpoint_every = 64\ntrain.grid_every = None")
    runs = {}
    for precision in ("float64", "float32"):
        config.parse([], [], text=text + f"\nDevice.precision = '{precision}'")
        runs[precision] = train(tmp_path / precision)
    assert json.loads((runs["float32"] / "run.json").read_text())["device"]["precision"] == "float32"
    losses = [[json.loads(l)["loss"] for l in (runs[k] / "metrics.jsonl").read_text().splitlines()] for k in runs]
    assert len(losses[0]) == 4 and losses[1] == pytest.approx(losses[0], rel=1e-4) and losses[1] != losses[0]
    with pytest.raises(Exception, match="Device.precision"):
        Device("cpu", precision="float16")
