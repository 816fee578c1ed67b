"""Guided distillation's stage 2 on latents (diffusers UNets with a w input, tests/tiny_diffusers.py): a stage-1 run
on the tiny class-conditional folder is distilled in steps with w as an input by BTD (deterministic and stochastic
students) and TRACT (clip False), through launch; the targets at a fixed w are two teacher DDIM steps at that w then
the inversion, unclipped; they reduce to the unguided targets for a teacher that ignores w; and a stage-2 student
samples at w, unclipped, differently for two w."""
import json
import subprocess
import sys

import pytest
import torch

from tests import tiny_diffusers as tiny
from tests.test_latent_engine import ROOT, SCHEDULE, inputs
from tests.test_latent_guided import STAGE_1, W_STUDENT
from tests.test_methods import phase_of
from tests.tiny_latents import CPU_RUN
from tract_repro.diffusion.grid import TimeGrid
from tract_repro.methods import BTD, TRACT
from tract_repro.methods.base import Networks
from tract_repro.methods.btd import btd_indices
from tract_repro.methods.tract import tract_indices
from tract_repro.networks.conditioning import NULL_LABEL, Cond
from tract_repro.networks.denoiser import VPDenoiser
from tract_repro.networks.diffusers_net import diffusers_network, load_folder
from tract_repro.training import checkpoint as ckpt

D = 32  # the tiny students' time_cond_proj_dim
W_RANGE = (0.0, 4.0)

STAGE_2 = W_STUDENT + """train.teacher = '{teacher}'
train.batch_size = 4
train.total = {total}
train.checkpoint_every = 8
""" + CPU_RUN

METHODS = {
    "btd": "train.method = @BTD()\nBTD.start_steps = 8\nBTD.final_steps = 2\nBTD.guidance = (0.0, 4.0)\n",
    "tract": "train.method = @TRACT()\nTRACT.schedule = (8, 2, 1)\nTRACT.guidance = (0.0, 4.0)\nTRACT.clip = False\n",
    "stochastic": "train.method = @BTD()\nBTD.start_steps = 8\nBTD.final_steps = 2\nBTD.guidance = (0.0, 4.0)\n"
                  "BTD.stochastic = True\n",
}
TOTALS = {"btd": 8, "tract": 8, "stochastic": 8}  # 4 samples a phase


def start(gin_file, workdir):
    return subprocess.Popen([sys.executable, "-m", "tract_repro.launch", str(gin_file), "--workdir", str(workdir)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(process):
    out, err = process.communicate(timeout=600)
    return process.returncode, err


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The tiny class-conditional folder; its stage-1 w student (launch); BTD, TRACT and stochastic BTD stage 2 from it
    (three launches side by side)."""
    root = tmp_path_factory.mktemp("stage2")
    folder = tiny.class_conditional_folder(root / "classes")
    (root / "stage1.gin").write_text(STAGE_1.format(folder=folder, dim=D))
    code, err = finish(start(root / "stage1.gin", root / "stage1"))
    assert code == 0, err[-3000:]
    processes = {}
    for name, method in METHODS.items():
        (root / f"{name}.gin").write_text(STAGE_2.format(folder=folder, dim=D, teacher=root / "stage1",
                                                         total=TOTALS[name]) + method)
        processes[name] = start(root / f"{name}.gin", root / name)
    done = {name: finish(p) for name, p in processes.items()}
    return dict(folder=folder, stage1=root / "stage1", done=done, **{name: root / name for name in METHODS})


@pytest.mark.parametrize("name", list(METHODS))
def test_stage_2_runs_through_launch_unbounded_with_its_w_range_and_a_w_student(runs, name):
    from tract_repro.evaluation.runs import load_run

    code, err = runs["done"][name]
    assert code == 0, err[-3000:]
    info = json.loads((runs[name] / "run.json").read_text())
    method = "TRACT" if name == "tract" else "BTD"
    assert (info["status"], info["method"], info["bounded"], info["guided"]) == ("complete", method, False, True)
    assert info["w_range"] == list(W_RANGE)
    run = load_run(runs[name])
    assert run.denoiser.net.extra_conditions == ("w",) and run.bounded is False
    steps = {"btd": [8, 4, 2], "stochastic": [8, 4, 2], "tract": [8, 2, 1]}[name]
    assert info["schedule_steps"] == steps and info["final_student_steps"] == steps[-1]


GRID = TimeGrid(SCHEDULE, 64)
LABELS = torch.tensor([1, 4, NULL_LABEL, 9, 0, 7])


def cond_at(w, labels=LABELS):
    return Cond(labels, {"w": torch.full(labels.shape, float(w), dtype=torch.float64)})


def ddim(x_t, x_hat, t, s):
    """One unclipped DDIM step t → s on the grid: x_s = α_s·x̂ + σ_s·(x_t − α_t·x̂)/σ_t (method-spec §2)."""
    _, a_t, s_t = GRID.at(t)
    _, a_s, s_s = GRID.at(s)
    return a_s * x_hat + s_s * (x_t - a_t * x_hat) / s_t


def inversion(x_t, x_s, t, s):
    """x̃ = (σ_s·x_t − σ_t·x_s)/(α_t·σ_s − α_s·σ_t): the x̂ whose DDIM step t → s lands on x_s."""
    _, a_t, s_t = GRID.at(t)
    _, a_s, s_s = GRID.at(s)
    return (s_s * x_t - s_t * x_s) / (a_t * s_s - a_s * s_t)


def at_w(denoiser, w):
    """x̂(x, λ) of ``denoiser`` at guidance weight w (for every row), the labels of LABELS."""
    return lambda x, logsnr: denoiser(x, logsnr, cond_at(w, LABELS[:x.shape[0]]))


def replay(method, S, p, nets, seed):
    """The method's target for the latents of ``inputs`` and the time indices it drew (its generator replayed)."""
    x, _ = inputs(n=6, seed=3, text=False)
    gen = torch.Generator().manual_seed(seed)
    state = gen.get_state()
    with torch.no_grad():
        target = method(x, Cond(LABELS), phase_of(S, p), nets, GRID, gen)
    gen.set_state(state)
    return target, gen


@pytest.fixture(scope="module")
def stage_1(runs):
    from tract_repro.evaluation.runs import load_run

    return load_run(runs["stage1"], with_data=False).denoiser.eval()


@pytest.mark.parametrize("stochastic", [False, True])
def test_the_guided_btd_target_at_a_fixed_w_is_two_teacher_steps_at_that_w_then_the_inversion(stage_1, stochastic):
    S = (8, 4, 2)
    for w in (0.0, 2.5):
        for p in (0, 1):
            method = BTD(start_steps=8, final_steps=2, guidance=(w, w), stochastic=stochastic)
            target, gen = replay(method, S, p, Networks(stage_1), seed=13 + p)  # seed 14: the last level drawn
            every_level = stochastic and p == 1
            t, t_mid, s = btd_indices(S, p, 64, 6, gen, every_level=every_level)
            assert torch.equal(target.cond.extra["w"], torch.full((6,), w, dtype=torch.float64))
            D = at_w(stage_1, w)
            with torch.no_grad():
                x_hat_t = D(target.x_t, GRID.at(t)[0])
                x_mid = ddim(target.x_t, x_hat_t, t, t_mid)
                # where t_mid = 0 (the stochastic student's last level) the first step has landed: its x̂ is the target
                x_hat_mid = torch.where((t_mid > 0).view(-1, 1, 1, 1), D(x_mid, GRID.at(t_mid.clamp(min=1))[0]), x_hat_t)
            x_s = ddim(x_mid, x_hat_mid, t_mid, s)
            final = (s == 0).view(-1, 1, 1, 1)
            expected = torch.where(final, x_hat_mid, inversion(target.x_t, x_s, t, s))
            torch.testing.assert_close(target.x_target, expected, rtol=1e-5, atol=1e-5)
            assert target.x_target.abs().max() > 1  # unclipped: latents leave [−1, 1]
            if every_level:
                assert bool((t_mid == 0).any()) and bool((t_mid > 0).any())
    other, _ = replay(BTD(start_steps=8, final_steps=2, guidance=(0.0, 0.0)), S, 0, Networks(stage_1), seed=11)
    at_4, _ = replay(BTD(start_steps=8, final_steps=2, guidance=(4.0, 4.0)), S, 0, Networks(stage_1), seed=11)
    assert torch.equal(other.x_t, at_4.x_t) and not torch.allclose(other.x_target, at_4.x_target)  # w reaches the teacher


def test_the_guided_tract_target_at_a_fixed_w_is_the_teacher_then_self_teacher_step_at_that_w(stage_1, runs):
    from tract_repro.evaluation.runs import load_run

    self_teacher = load_run(runs["tract"], with_data=False).denoiser.eval()
    S = (8, 2, 1)
    for w in (0.0, 2.5):
        for p in (0, 1):
            method = TRACT(schedule=S, clip=False, guidance=(w, w))
            target, gen = replay(method, S, p, Networks(stage_1, self_teacher), seed=5 + p)
            t, t1, ti = tract_indices(S, p, 64, 6, gen)
            with torch.no_grad():
                x_t1 = ddim(target.x_t, at_w(stage_1, w)(target.x_t, GRID.at(t)[0]), t, t1)
                rest = (t1 != ti).view(-1, 1, 1, 1)
                x_ti = torch.where(rest, ddim(x_t1, at_w(self_teacher, w)(x_t1, GRID.at(t1)[0]), t1, ti), x_t1)
            torch.testing.assert_close(target.x_target, inversion(target.x_t, x_ti, t, ti), rtol=1e-5, atol=1e-5)
            assert target.x_target.abs().max() > 1
            if p == 0:
                assert bool(rest.any()) and bool((~rest).any())  # both the self-teacher and the finished groups


@pytest.mark.parametrize("name", ["btd", "stochastic", "tract"])
def test_stage_2_targets_reduce_to_the_unguided_ones_for_a_teacher_that_ignores_w(runs, name):
    """A fresh w student (cond_proj zero: the folder's UNet at every w) as teacher and self-teacher of a guided method
    gives, bit for bit, the unguided method's targets from the folder's UNet with the same randomness."""
    from tests.test_latent_guided import perturb

    folder = runs["folder"]
    plain = VPDenoiser(load_folder(folder), SCHEDULE, "eps").eval()
    w_net = VPDenoiser(diffusers_network(folder=folder, time_cond_proj_dim=D), SCHEDULE, "eps").eval()
    plain_self = VPDenoiser(perturb(load_folder(folder)), SCHEDULE, "eps").eval()
    w_self = VPDenoiser(perturb(diffusers_network(folder=folder, time_cond_proj_dim=D),
                                skip=("model.time_embedding.cond_proj",)), SCHEDULE, "eps").eval()
    if name == "tract":
        S, make = (8, 2, 1), lambda **kw: TRACT(schedule=(8, 2, 1), clip=False, **kw)
    else:
        S, make = (8, 4, 2), lambda **kw: BTD(start_steps=8, final_steps=2, stochastic=name == "stochastic", **kw)
    for p in range(len(S) - 1):
        unguided, _ = replay(make(), S, p, Networks(plain, plain_self), seed=p)
        guided, _ = replay(make(guidance=W_RANGE), S, p, Networks(w_net, w_self), seed=p)
        for field in ("x_t", "logsnr", "x_target", "weight"):
            assert torch.equal(getattr(unguided, field), getattr(guided, field)), (p, field)
        w = guided.cond.extra["w"]
        assert "w" not in unguided.cond.extra and len(set(w.tolist())) == 6 and bool(((w >= 0) & (w <= 4)).all())


@pytest.mark.parametrize("name", ["btd", "tract", "stochastic"])
def test_a_stage_2_student_samples_at_w_unclipped_and_differently_for_two_w(runs, name):
    """conditioned(run, w) gives the student itself with w as its input; K-step DDIM (clip False) at w = 0 and 4."""
    from tract_repro.evaluation.metrics import conditioned
    from tract_repro.evaluation.runs import load_run
    from tract_repro.sampling import registry

    run = load_run(runs[name], with_data=False)
    assert not run.bounded
    proj = run.denoiser.net.model.time_embedding.cond_proj.weight
    stage_1 = ckpt.load(runs["stage1"] / "ema.pt")["net.model.time_embedding.cond_proj.weight"]
    assert stage_1.any() and not torch.equal(proj, stage_1)  # the w branch, trained in stage 1, moved on in stage 2
    steps = 2 if name != "tract" else 1
    noise = torch.randn(3, tiny.LATENT_CHANNELS, tiny.LATENT_SIZE, tiny.LATENT_SIZE, dtype=torch.float64,
                        generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([1, 5, 8])
    samples = []
    for w in (0.0, 4.0):
        denoiser, extra, calls = conditioned(run, w)
        assert extra == {"w": w} and calls == 1 and denoiser is run.denoiser
        cond = Cond(labels, {"w": torch.full((3,), extra["w"], dtype=torch.float64)})
        with torch.no_grad():
            samples.append(registry.sample("ddim", denoiser, run.grid, steps, noise, cond, clip=False))
    a, b = samples
    assert torch.isfinite(a).all() and torch.isfinite(b).all() and not torch.allclose(a, b)
    assert max(a.abs().max(), b.abs().max()) > 1  # unclipped latents
