"""Data-parallel training: rank-count-independent randomness, gradient accumulation, and a 2-process gloo run."""
import json
import os
import shutil
import socket
from pathlib import Path

import gin
import pytest
import torch
import torch.multiprocessing as mp

from tests.conftest import bitwise_equal, random_teacher, tiny_gin
from tract_repro import config
from tract_repro.data.arrays import ImageArrays
from tract_repro.common.batch_random import StepRandom, as_batch_random
from tract_repro.diffusion.grid import TimeGrid
from tract_repro.diffusion.schedules import CosineSchedule
from tract_repro.methods import TRACT, TeacherTraining
from tract_repro.methods.base import Networks
from tract_repro.methods.phases import plan_phases
from tract_repro.training import checkpoint as ckpt
from tract_repro.training.device import Device
from tract_repro.training.distributed import batch_slices, process_group
from tract_repro.training.loop import train

GRID = TimeGrid(CosineSchedule(), 64)
# TRACT with two phases (a phase boundary), the official 'sum' reduction so that clipping at 1.0 is active
RUN = tiny_gin("train.method = @TRACT()\nTRACT.schedule = (64, 8, 1)\ntrain.teacher = 'TEACHER'\n"
               "train.loss_reduction = 'sum'\ninference_ema_momentum.momentum = 0.9\nDevice.name = 'cpu'",
               total=256, extra="train.log_every = 32\ntrain.checkpoint_every = 128\ntrain.keep_checkpoints = 4")


def run_text(teacher, extra=""):
    return RUN.replace("'TEACHER'", repr(str(teacher))) + "\n" + extra




def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]



def fake_denoiser(scale, shift):
    def D(x_t, logsnr, labels=None):
        return scale * torch.tanh(x_t + shift * torch.tanh(logsnr / 10).view(-1, 1, 1, 1))
    return D


NETS = Networks(fake_denoiser(1.6, 0.3), fake_denoiser(1.2, -0.5))


# --- the random source ------------------------------------------------------------------------------------------

def test_a_whole_batch_source_makes_exactly_the_generator_calls_of_before():
    """One process, no accumulation: the same torch calls on the same generator, so old runs are bit-identical."""
    a, b = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    rng = StepRandom(a, 12).slice()
    assert torch.equal(rng.rand(), torch.rand(12, generator=b))
    assert torch.equal(rng.randint(1, 8), torch.randint(1, 9, (12,), generator=b))
    assert torch.equal(rng.randn((1, 8, 8), dtype=torch.float64), torch.randn((12, 1, 8, 8), generator=b, dtype=torch.float64))
    assert torch.equal(rng.rand(dtype=torch.float64), torch.rand(12, generator=b, dtype=torch.float64))
    assert torch.equal(a.get_state(), b.get_state())


@pytest.mark.parametrize("method", [TRACT(schedule=(64, 8, 1)), TeacherTraining()], ids=["tract", "teacher"])
def test_slices_of_a_batch_get_their_rows_of_the_whole_batch_draws(method):
    x = torch.rand((12, 1, 4, 4), generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2 - 1
    phase = plan_phases(method.steps(64), per_phase=[1] * (len(method.steps(64)) - 1))[0]
    whole_gen, split_gen = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    whole = method(x, None, phase, NETS, GRID, whole_gen)
    step = StepRandom(split_gen, 12)
    for start, stop in [(4, 8), (0, 4), (8, 12)]:  # any order: every slice sees the same global draws
        part = method(x[start:stop], None, phase, NETS, GRID, step.slice(start, stop))
        for field in ("x_t", "logsnr", "x_target", "weight"):  # vectorised log/tan may round a batch of 4 and
            # of 12 1 ulp apart; other draws would differ by O(1)
            torch.testing.assert_close(getattr(part, field), getattr(whole, field)[start:stop], rtol=1e-12, atol=0)
    assert torch.equal(whole_gen.get_state(), split_gen.get_state())  # the generator advanced exactly once


def test_horizontal_flips_follow_the_sample_not_the_slice():
    images = torch.arange(10 * 8 * 8, dtype=torch.float32).view(10, 1, 8, 8) / 640 * 2 - 1
    data = ImageArrays(images, torch.arange(10), 10, hflip=True)
    idx = torch.tensor([3, 1, 4, 0, 5, 9, 2, 6])
    whole, _ = data.batch(idx, torch.Generator().manual_seed(1))
    step = StepRandom(torch.Generator().manual_seed(1), 8)
    parts = [data.batch(idx[s:e], step.slice(s, e))[0] for s, e in [(0, 2), (2, 6), (6, 8)]]
    assert torch.equal(torch.cat(parts), whole)
    assert not torch.equal(whole, data.batch(idx, torch.Generator().manual_seed(1))[0].flip(-1))


def test_a_slice_that_draws_differently_or_a_wrong_size_is_refused():
    step = StepRandom(torch.Generator().manual_seed(0), 8)
    step.slice(0, 4).randint(1, 4)
    with pytest.raises(RuntimeError, match="must not depend on its data"):
        step.slice(4, 8).randn()
    with pytest.raises(ValueError, match="batch of 5"):
        as_batch_random(step.slice(0, 4), 5)


# --- slices and collectives --------------------------------------------------------------------------------------

def test_each_rank_gets_its_contiguous_slice_in_equal_micro_batches():
    assert batch_slices(16) == [(0, 16)]
    assert batch_slices(16, 2, 0) == [(0, 8)] and batch_slices(16, 2, 1) == [(8, 16)]
    assert batch_slices(16, 2, 1, accumulate=2) == [(8, 12), (12, 16)]
    assert batch_slices(24, 3, 2, accumulate=4) == [(16, 18), (18, 20), (20, 22), (22, 24)]
    for args, fix in [((16, 3, 0, 1), "multiple of 3"), ((16, 2, 0, 3), "multiple of 6"), ((16, 1, 0, 0), "use 1")]:
        with pytest.raises(ValueError, match=fix) as info:
            batch_slices(*args)
        assert "\n" not in str(info.value)


def test_a_batch_that_does_not_split_stops_the_run_before_it_writes(tmp_path):
    config.parse([], [], text=RUN + "\ntrain.accumulate = 3")
    with pytest.raises(ValueError, match="train.batch_size = 16 does not split .* multiple of 3"):
        train(tmp_path)
    assert list(tmp_path.iterdir()) == []


def _sum_gradients_worker(rank, world_size, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size))
    with process_group(Device("cpu")) as world:
        assert (world.rank, world.size, world.is_main) == (rank, 2, rank == 0)
        torch.manual_seed(0)
        used, sometimes, never = (torch.nn.Linear(2, 1) for _ in range(3))
        params = [*used.parameters(), *sometimes.parameters(), *never.parameters()]
        x = torch.full((1, 2), float(rank + 1))
        loss = used(x).sum() + (sometimes(x).sum() if rank == 0 else 0)  # rank 1 leaves `sometimes` unused
        loss.backward()
        total = world.sum_gradients(params, loss.detach())
        assert torch.equal(used.weight.grad, torch.full((1, 2), 3.0))  # 1 + 2, summed over the ranks
        assert torch.equal(sometimes.weight.grad, torch.full((1, 2), 1.0))  # rank 1 counts as zeros
        assert never.weight.grad is None and never.bias.grad is None  # unused everywhere: stays None, as in one process
        torch.testing.assert_close(total, sum(used(torch.full((1, 2), r + 1.0)).sum() for r in (0, 1)).detach()
                                   + sometimes(torch.full((1, 2), 1.0)).sum().detach())
        world.check_in_sync([used], "here")
        with torch.no_grad():
            used.bias += rank
        with pytest.raises(RuntimeError, match="ranks' weights differ here"):
            world.check_in_sync([used], "here")
        assert world.broadcast(f"rank {rank}") == "rank 0" and world.gather(rank) == [0, 1]


def test_gradients_are_summed_over_ranks_and_out_of_step_ranks_are_caught():
    mp.start_processes(_sum_gradients_worker, args=(2, free_port()), nprocs=2, start_method="fork")


# --- whole runs -------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return random_teacher(tmp_path_factory)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, teacher):
    """The one-process run at the global batch of 16."""
    gin.clear_config()
    config.parse([], [], text=run_text(teacher))
    try:
        return train(tmp_path_factory.mktemp("reference"))
    finally:
        gin.clear_config()


def _worker(rank, world_size, port, text, workdir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank), TQDM_DISABLE="1")
    gin.clear_config()
    config.parse([], [], text=text)
    train(workdir)


def run_processes(text, workdir, world_size=2):
    """The real train() in ``world_size`` processes over gloo on this machine, as a launcher would start them.

    The processes are forked from this one, which has torch, sklearn and the project imported already:
    a fresh interpreter would spend ~10 s of CPU importing them, which is most of a tiny run.
    """
    Path(workdir).mkdir(parents=True, exist_ok=True)
    mp.start_processes(_worker, args=(world_size, free_port(), text, str(workdir)), nprocs=world_size, start_method="fork")
    return Path(workdir)


def final_state(run):
    return ckpt.load(ckpt.list_checkpoints(run / "checkpoints")[-1])


def metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def assert_same_training(run, reference, atol):
    """Same weights (student, EMAs, self-teacher, teacher) to float tolerance, same logged losses, same random draws."""
    a, b = final_state(run), final_state(reference)
    assert a["samples"] == b["samples"] == 256
    assert torch.equal(a["rng_method"], b["rng_method"])  # the method generator made exactly the same draws
    for key in ("student", "inference_ema", "self_teacher", "teacher"):
        mine, theirs = (a[key]["module"], b[key]["module"]) if "module" in a[key] else (a[key], b[key])
        for name in theirs:
            torch.testing.assert_close(mine[name], theirs[name], rtol=0, atol=atol, msg=f"{key}.{name}")
    ma, mb = metrics(run), metrics(reference)
    assert [m["samples"] for m in ma] == [m["samples"] for m in mb] and len(ma) == 8
    for x, y in zip(ma, mb):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5) and x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-5)
    assert mb[0]["grad_norm"] > 1  # clipping was active, so the clipped norm had to be the global one
    torch.testing.assert_close(torch.load(run / "ema.pt", weights_only=True), torch.load(reference / "ema.pt", weights_only=True),
                               rtol=0, atol=atol)


def test_two_gloo_processes_train_like_one_process_at_the_same_global_batch(tmp_path, teacher, reference):
    run = run_processes(run_text(teacher), tmp_path / "ddp")
    assert_same_training(run, reference, atol=1e-5)
    info = json.loads((run / "run.json").read_text())
    assert (info["world_size"], info["accumulate"], info["batch_size"], info["status"]) == (2, 1, 16, "complete")
    assert json.loads((reference / "run.json").read_text())["world_size"] == 1


def test_accumulating_two_micro_batches_trains_like_the_full_batch(tmp_path, teacher, reference):
    config.parse([], [], text=run_text(teacher, "train.accumulate = 2"))
    run = train(tmp_path)
    assert_same_training(run, reference, atol=1e-5)
    assert json.loads((run / "run.json").read_text())["accumulate"] == 2


def test_a_two_process_run_with_dropout_resumes_exactly(tmp_path, teacher):
    """Every rank's dropout stream is in the checkpoint: resuming 2 ranks from the middle ends bit-identical."""
    text = run_text(teacher, "UNet.dropout = 0.1\ntrain.accumulate = 2")
    straight = run_processes(text, tmp_path / "straight")
    resumed = tmp_path / "resumed"
    shutil.copytree(straight, resumed)
    for p in ckpt.list_checkpoints(resumed / "checkpoints")[1:]:
        p.unlink()  # as if killed after the checkpoint at 128 samples
    (resumed / "ema.pt").unlink()
    assert [p.name for p in ckpt.list_checkpoints(resumed / "checkpoints")] == ["ckpt_000000000128.pt"]
    run_processes(text, resumed)
    a, b = final_state(straight), final_state(resumed)
    assert len(a["rng_torch_ranks"]) == 2 and not torch.equal(*a["rng_torch_ranks"])  # two distinct dropout streams
    assert a.keys() == b.keys()
    for key in a:
        assert bitwise_equal(a[key], b[key]), f"{key} differs after resume"
    ea, eb = torch.load(straight / "ema.pt", weights_only=True), torch.load(resumed / "ema.pt", weights_only=True)
    assert all(torch.equal(ea[k], eb[k]) for k in ea)
    strip = lambda run: [l.split('"samples_per_s"')[0] for l in (run / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert strip(straight) == strip(resumed)




def test_noise_drawn_on_the_device_is_split_independent_resumes_exactly_and_differs_from_cpu_noise(tmp_path, teacher,
                                                                                                   reference):
    """Device.noise = 'device': the step's draws come from a generator seeded by (seed, step) on the training device
    (the CPU here): two micro-batches train like the full batch, a resume from the middle ends bit-identical with no
    generator state, and the draws are not the CPU generator's."""
    text = run_text(teacher, "Device.noise = 'device'")
    config.parse([], [], text=text)
    full = train(tmp_path / "full")
    config.parse([], [], text=text + "\ntrain.accumulate = 2")
    assert_same_training(train(tmp_path / "accumulated"), full, atol=1e-5)
    resumed = tmp_path / "resumed"
    shutil.copytree(full, resumed)
    for p in ckpt.list_checkpoints(resumed / "checkpoints")[1:]:
        p.unlink()
    (resumed / "ema.pt").unlink()
    config.parse([], [], text=text)
    train(resumed)
    a, b = final_state(full), final_state(resumed)
    for key in a:
        assert bitwise_equal(a[key], b[key]), f"{key} differs after resume"
    assert metrics(full)[0]["loss"] != metrics(reference)[0]["loss"]  # other draws than the CPU generator's
    assert json.loads((full / "run.json").read_text())["device"]["noise"] == "device"


def test_the_step_generator_depends_on_seed_and_step_alone():
    from tract_repro.common.batch_random import step_generator

    draw = lambda seed, step: torch.randn(4, generator=step_generator(seed, step))  # noqa: E731
    assert torch.equal(draw(3, 7), draw(3, 7))
    assert not torch.equal(draw(3, 7), draw(3, 8)) and not torch.equal(draw(3, 7), draw(4, 7))
    assert not torch.equal(draw(0, 2**32), draw(0, 0))  # mixed, not truncated to 32 bits
    with pytest.raises(Exception, match="Device.noise"):
        Device("cpu", noise="gpu")
