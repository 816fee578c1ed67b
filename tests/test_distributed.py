"""Data-parallel training: per-sample randomness that does not depend on how a batch is split."""

import pytest
import torch

from tract_repro.data.arrays import ImageArrays
from tract_repro.data.batch_random import StepRandom, as_batch_random
from tract_repro.diffusion.grid import TimeGrid
from tract_repro.diffusion.schedules import CosineSchedule
from tract_repro.methods import TRACT, TeacherTraining
from tract_repro.methods.base import Networks
from tract_repro.methods.phases import plan_phases

GRID = TimeGrid(CosineSchedule(), 64)


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
