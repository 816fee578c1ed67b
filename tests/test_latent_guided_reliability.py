"""A latent guided stage-1 run (the class-conditional tiny diffusers folder, tiny latents, CPU) killed with SIGKILL
after its first checkpoint and started again with the same command ends bit-identical to an uninterrupted run; and
such a run, sampled at a w outside its run.json's w_range, warns once in one line (a guided teacher never does)."""
import json
import warnings
from dataclasses import replace

import pytest
import torch

from tests import tiny_diffusers as tiny
from tests.conftest import bitwise_equal
from tests.test_latent_engine import SCHEDULE
from tests.test_latent_guided import D, STAGE_1
from tests.test_resume import finish, kill_after_checkpoint, launch
from tract_repro.common.errors import GuidanceRangeWarning
from tract_repro.evaluation.metrics import conditioned
from tract_repro.evaluation.runs import load_run
from tract_repro.networks.denoiser import VPDenoiser
from tract_repro.networks.diffusers_net import load_folder
from tract_repro.networks.guidance import GuidedDenoiser
from tract_repro.training import checkpoint as ckpt

TOTAL = 32  # 8 steps of 4 latents, a checkpoint every 8 samples


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """``straight`` run uninterrupted, ``resumed`` killed at its first checkpoint then relaunched as it was."""
    root = tmp_path_factory.mktemp("latent_stage1")
    folder = tiny.class_conditional_folder(root / "classes")
    gin_file = root / "stage1.gin"
    gin_file.write_text(STAGE_1.format(folder=folder, dim=D).replace("train.total = 12", f"train.total = {TOTAL}"))
    finish(launch(gin_file, root / "straight"))
    killed_at = kill_after_checkpoint(gin_file, root / "resumed", min_samples=8)
    interrupted = dict(killed_at=killed_at, had_ema=(root / "resumed" / "ema.pt").exists(),
                       status=json.loads((root / "resumed" / "run.json").read_text()).get("status"))
    finish(launch(gin_file, root / "resumed"))
    return root, interrupted


def test_a_latent_stage_1_run_killed_after_its_first_checkpoint_resumes_exactly(runs):
    root, interrupted = runs
    assert 8 <= interrupted["killed_at"] < TOTAL and not interrupted["had_ema"] and interrupted["status"] != "complete"
    for name in ("straight", "resumed"):
        info = json.loads((root / name / "run.json").read_text())
        assert (info["status"], info["method"], info["w_range"]) == ("complete", "GuidedDistillation", [0.0, 4.0])
    a = ckpt.load(ckpt.list_checkpoints(root / "straight" / "checkpoints")[-1])
    b = ckpt.load(ckpt.list_checkpoints(root / "resumed" / "checkpoints")[-1])
    assert a["samples"] == b["samples"] == TOTAL and a.keys() == b.keys()
    for key in a:  # weights, EMA, optimiser state, RNG states, data position
        assert bitwise_equal(a[key], b[key]), f"{key} differs after resume"
    ema_a, ema_b = ckpt.load(root / "straight" / "ema.pt"), ckpt.load(root / "resumed" / "ema.pt")
    assert ema_a.keys() == ema_b.keys() and all(torch.equal(ema_a[k], ema_b[k]) for k in ema_a)
    assert ema_a["net.model.time_embedding.cond_proj.weight"].any()  # the w branch trained, so equality means something
    rows = [[line.split('"samples_per_s"')[0] for line in (root / name / "metrics.jsonl").read_text().splitlines()]
            for name in ("straight", "resumed")]
    assert rows[0] == rows[1]  # the metrics log rewound to the checkpoint, not duplicated


def range_warnings(run, w):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        denoiser, extra, calls = conditioned(run, w)
    return [c for c in caught if issubclass(c.category, GuidanceRangeWarning)], (denoiser, extra, calls)


def test_a_w_outside_the_trained_range_warns_once_in_one_line(runs):
    root, _ = runs
    run = load_run(root / "straight")
    for w in (-0.5, 4.5, 7.5):
        found, (denoiser, extra, calls) = range_warnings(run, w)
        assert len(found) == 1, [str(f.message) for f in found]
        message = str(found[0].message)
        assert "\n" not in message and str(run.path) in message and f"w = {w:g}" in message, message
        assert "[0, 4]" in message and "not trained there" in message, message
        assert issubclass(found[0].category, UserWarning)
        assert (denoiser, extra, calls) == (run.denoiser, {"w": w}, 1)  # it still samples, at the w asked for
    for w in (0.0, 1.0, 4.0):
        assert range_warnings(run, w)[0] == []


def test_a_run_without_w_range_takes_any_w_without_a_warning(runs):
    """A guided teacher (label dropout, no w input, no w_range: the folder's own UNet) and a w student whose run.json
    records no range are sampled at any w silently."""
    root, _ = runs
    run = load_run(root / "straight")
    unranged = replace(run, info={k: v for k, v in run.info.items() if k != "w_range"})
    found, (denoiser, extra, calls) = range_warnings(unranged, 9.0)
    assert found == [] and (denoiser, extra, calls) == (run.denoiser, {"w": 9.0}, 1)
    teacher = replace(run, path=root / "classes", info={"p_uncond": 0.1},
                      denoiser=VPDenoiser(load_folder(root / "classes"), SCHEDULE, "eps"))
    for w in (-0.5, 0.0, 9.0):
        found, (denoiser, extra, calls) = range_warnings(teacher, w)
        assert found == [] and isinstance(denoiser, GuidedDenoiser) and (extra, calls) == ({"w": w}, 2)
