"""Guided distillation's stage 2 on latents (diffusers UNets with a w input, tests/tiny_diffusers.py): a stage-1 run
on the tiny class-conditional folder is distilled in steps with w as an input by BTD (deterministic and stochastic
students) and TRACT (clip False), through launch; the targets at a fixed w are two teacher DDIM steps at that w then
the inversion, unclipped; they reduce to the unguided targets for a teacher that ignores w; and a stage-2 student
samples at w, unclipped, differently for two w.  The text-to-image case (the tiny Stable Diffusion folder, captioned
tiny latents, ∅ the empty prompt): stage 1 then BTD and TRACT stage 2 through launch, the same checks with the
captions' embeddings passed to the teacher."""
import json
import subprocess
import sys

import pytest
import torch

from tests import tiny_diffusers as tiny
from tests.test_latent_engine import ROOT, SCHEDULE, TEXT, inputs
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
#: the stage-2 runs launched for each kind of tiny folder (text: the deterministic BTD and TRACT students)
KINDS = {"classes": list(METHODS), "text": ["btd", "tract"]}
CAPTIONED = f"tiny_latents.text_shape = {TEXT}\n"  # appended to a run file: captioned tiny latents


def start(gin_file, workdir):
    return subprocess.Popen([sys.executable, "-m", "tract_repro.launch", str(gin_file), "--workdir", str(workdir)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(process):
    out, err = process.communicate(timeout=600)
    return process.returncode, err


def launch_all(root, folder, names, extra=""):
    """Stage 1 on ``folder`` (launch), then the stage-2 runs ``names`` from it, side by side (``extra``: appended
    to every run file)."""
    (root / "stage1.gin").write_text(STAGE_1.format(folder=folder, dim=D) + extra)
    code, err = finish(start(root / "stage1.gin", root / "stage1"))
    assert code == 0, err[-3000:]
    processes = {}
    for name in names:
        (root / f"{name}.gin").write_text(STAGE_2.format(folder=folder, dim=D, teacher=root / "stage1",
                                                         total=TOTALS[name]) + METHODS[name] + extra)
        processes[name] = start(root / f"{name}.gin", root / name)
    done = {name: finish(p) for name, p in processes.items()}
    return dict(folder=folder, stage1=root / "stage1", done=done, **{name: root / name for name in names})


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The tiny class-conditional folder; its stage-1 w student (launch); BTD, TRACT and stochastic BTD stage 2 from it
    (three launches side by side)."""
    root = tmp_path_factory.mktemp("stage2")
    return launch_all(root, tiny.class_conditional_folder(root / "classes"), KINDS["classes"])


@pytest.fixture(scope="module")
def text_runs(tmp_path_factory):
    """The tiny Stable Diffusion folder on captioned tiny latents: its stage-1 w student, BTD and TRACT stage 2."""
    root = tmp_path_factory.mktemp("stage2_text")
    return launch_all(root, tiny.stable_diffusion_folder(root / "sd"), KINDS["text"], CAPTIONED)


def runs_of(request, kind):
    return request.getfixturevalue("runs" if kind == "classes" else "text_runs")


@pytest.mark.parametrize("kind, name", [(kind, name) for kind, names in KINDS.items() for name in names])
def test_stage_2_runs_through_launch_unbounded_with_its_w_range_and_a_w_student(request, kind, name):
    from tract_repro.evaluation.runs import load_run

    runs = runs_of(request, kind)
    code, err = runs["done"][name]
    assert code == 0, err[-3000:]
    info = json.loads((runs[name] / "run.json").read_text())
    method = "TRACT" if name == "tract" else "BTD"
    assert (info["status"], info["method"], info["bounded"], info["guided"]) == ("complete", method, False, True)
    assert info["w_range"] == list(W_RANGE)
    run = load_run(runs[name])
    assert run.denoiser.net.extra_conditions == ("w",) and run.bounded is False
    assert bool(run.data.text) == (kind == "text")
    steps = {"btd": [8, 4, 2], "stochastic": [8, 4, 2], "tract": [8, 2, 1]}[name]
    assert info["schedule_steps"] == steps and info["final_student_steps"] == steps[-1]


GRID = TimeGrid(SCHEDULE, 64)
LABELS = torch.tensor([1, 4, NULL_LABEL, 9, 0, 7])
PROMPTS = torch.tensor([0, 0, NULL_LABEL, 0, 0, 0])  # a text model's labels: 0 its captions, NULL_LABEL ∅ ("")


def batch_of(kind, seed=3):
    """Six latents and their conditioning: LABELS, or PROMPTS with caption embeddings (B, 77, 16)."""
    x, extra = inputs(n=6, seed=seed, text=kind == "text")
    return x, Cond(LABELS if kind == "classes" else PROMPTS, extra)


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


def at_w(denoiser, w, kind="classes"):
    """x̂(x, λ) of ``denoiser`` at guidance weight w (for every row), the conditioning of batch_of(kind)."""
    _, cond = batch_of(kind)
    return lambda x, logsnr: denoiser(x, logsnr, Cond(cond.labels, {**cond.extra,
                                                                    "w": torch.full((6,), float(w), dtype=torch.float64)}))


def replay(method, S, p, nets, seed, kind="classes"):
    """The method's target for the latents of ``batch_of(kind)`` and the time indices it drew (its generator replayed)."""
    x, cond = batch_of(kind)
    gen = torch.Generator().manual_seed(seed)
    state = gen.get_state()
    with torch.no_grad():
        target = method(x, cond, phase_of(S, p), nets, GRID, gen)
    gen.set_state(state)
    return target, gen


STAGE_1S = {}  # kind → its stage-1 denoiser, loaded once


def stage_1_of(request, kind):
    from tract_repro.evaluation.runs import load_run

    if kind not in STAGE_1S:
        STAGE_1S[kind] = load_run(runs_of(request, kind)["stage1"], with_data=False).denoiser.eval()
    return STAGE_1S[kind]


def captions_pass(target, kind):
    """The target's conditioning is the batch's, w added: the captions' embeddings go on to the student."""
    _, cond = batch_of(kind)
    assert torch.equal(target.cond.labels, cond.labels) and set(target.cond.extra) == {*cond.extra, "w"}
    assert all(torch.equal(target.cond.extra[k], v) for k, v in cond.extra.items())


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("stochastic", [False, True])
def test_the_guided_btd_target_at_a_fixed_w_is_two_teacher_steps_at_that_w_then_the_inversion(request, kind, stochastic):
    stage_1 = stage_1_of(request, kind)
    S = (8, 4, 2)
    for w in (0.0, 2.5):
        for p in (0, 1):
            method = BTD(start_steps=8, final_steps=2, guidance=(w, w), stochastic=stochastic)
            target, gen = replay(method, S, p, Networks(stage_1), seed=13 + p, kind=kind)  # seed 14: the last level drawn
            every_level = stochastic and p == 1
            t, t_mid, s = btd_indices(S, p, 64, 6, gen, every_level=every_level)
            assert torch.equal(target.cond.extra["w"], torch.full((6,), w, dtype=torch.float64))
            captions_pass(target, kind)
            D = at_w(stage_1, w, kind)
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
    other, _ = replay(BTD(start_steps=8, final_steps=2, guidance=(0.0, 0.0)), S, 0, Networks(stage_1), seed=11, kind=kind)
    at_4, _ = replay(BTD(start_steps=8, final_steps=2, guidance=(4.0, 4.0)), S, 0, Networks(stage_1), seed=11, kind=kind)
    assert torch.equal(other.x_t, at_4.x_t) and not torch.allclose(other.x_target, at_4.x_target)  # w reaches the teacher
    if kind == "text":  # so do the captions: other embeddings (the same latents and noise) give other targets
        x, cond = batch_of(kind)
        _, recaptioned = batch_of(kind, seed=4)
        gen = torch.Generator().manual_seed(11)
        with torch.no_grad():
            moved = BTD(start_steps=8, final_steps=2, guidance=(0.0, 0.0))(
                x, Cond(cond.labels, recaptioned.extra), phase_of(S, 0), Networks(stage_1), GRID, gen)
        assert torch.equal(moved.x_t, other.x_t) and not torch.allclose(moved.x_target, other.x_target)


@pytest.mark.parametrize("kind", list(KINDS))
def test_the_guided_tract_target_at_a_fixed_w_is_the_teacher_then_self_teacher_step_at_that_w(request, kind):
    from tract_repro.evaluation.runs import load_run

    stage_1 = stage_1_of(request, kind)
    self_teacher = load_run(runs_of(request, kind)["tract"], with_data=False).denoiser.eval()
    S = (8, 2, 1)
    for w in (0.0, 2.5):
        for p in (0, 1):
            method = TRACT(schedule=S, clip=False, guidance=(w, w))
            target, gen = replay(method, S, p, Networks(stage_1, self_teacher), seed=5 + p, kind=kind)
            t, t1, ti = tract_indices(S, p, 64, 6, gen)
            captions_pass(target, kind)
            with torch.no_grad():
                x_t1 = ddim(target.x_t, at_w(stage_1, w, kind)(target.x_t, GRID.at(t)[0]), t, t1)
                rest = (t1 != ti).view(-1, 1, 1, 1)
                x_ti = torch.where(rest, ddim(x_t1, at_w(self_teacher, w, kind)(x_t1, GRID.at(t1)[0]), t1, ti), x_t1)
            torch.testing.assert_close(target.x_target, inversion(target.x_t, x_ti, t, ti), rtol=1e-5, atol=1e-5)
            assert target.x_target.abs().max() > 1
            if p == 0:
                assert bool(rest.any()) and bool((~rest).any())  # both the self-teacher and the finished groups


@pytest.mark.parametrize("kind, name", [(kind, name) for kind, names in KINDS.items() for name in names])
def test_stage_2_targets_reduce_to_the_unguided_ones_for_a_teacher_that_ignores_w(request, kind, name):
    """A fresh w student (cond_proj zero: the folder's UNet at every w) as teacher and self-teacher of a guided method
    gives, bit for bit, the unguided method's targets from the folder's UNet with the same randomness."""
    from tests.test_latent_guided import perturb

    folder = runs_of(request, kind)["folder"]
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
        unguided, _ = replay(make(), S, p, Networks(plain, plain_self), seed=p, kind=kind)
        guided, _ = replay(make(guidance=W_RANGE), S, p, Networks(w_net, w_self), seed=p, kind=kind)
        for field in ("x_t", "logsnr", "x_target", "weight"):
            assert torch.equal(getattr(unguided, field), getattr(guided, field)), (p, field)
        w = guided.cond.extra["w"]
        assert "w" not in unguided.cond.extra and len(set(w.tolist())) == 6 and bool(((w >= 0) & (w <= 4)).all())


@pytest.mark.parametrize("kind, name", [(kind, name) for kind, names in KINDS.items() for name in names])
def test_a_stage_2_student_samples_at_w_unclipped_and_differently_for_two_w(request, kind, name):
    """conditioned(run, w) gives the student itself with w as its input; K-step DDIM (clip False) at w = 0 and 4."""
    from tract_repro.evaluation.metrics import conditioned
    from tract_repro.evaluation.runs import load_run
    from tract_repro.sampling import registry

    runs = runs_of(request, kind)
    run = load_run(runs[name], with_data=False)
    assert not run.bounded
    proj = run.denoiser.net.model.time_embedding.cond_proj.weight
    stage_1 = ckpt.load(runs["stage1"] / "ema.pt")["net.model.time_embedding.cond_proj.weight"]
    assert stage_1.any() and not torch.equal(proj, stage_1)  # the w branch, trained in stage 1, moved on in stage 2
    steps = 2 if name != "tract" else 1
    noise = torch.randn(3, tiny.LATENT_CHANNELS, tiny.LATENT_SIZE, tiny.LATENT_SIZE, dtype=torch.float64,
                        generator=torch.Generator().manual_seed(0))
    _, batch = batch_of(kind)
    labels = torch.tensor([1, 5, 8]) if kind == "classes" else PROMPTS[:3]  # text: two captions and ∅
    captions = {k: v[:3] for k, v in batch.extra.items()}
    samples = []
    for w in (0.0, 4.0):
        denoiser, extra, calls = conditioned(run, w)
        assert extra == {"w": w} and calls == 1 and denoiser is run.denoiser
        cond = Cond(labels, {**captions, "w": torch.full((3,), extra["w"], dtype=torch.float64)})
        with torch.no_grad():
            samples.append(registry.sample("ddim", denoiser, run.grid, steps, noise, cond, clip=False))
    a, b = samples
    assert torch.isfinite(a).all() and torch.isfinite(b).all() and not torch.allclose(a, b)
    assert max(a.abs().max(), b.abs().max()) > 1  # unclipped latents
    if name != "tract":  # Meng et al.'s stochastic sampler (`--sampler stochastic`) on the same latents, seeded
        with torch.no_grad():
            c = registry.sample("stochastic", denoiser, run.grid, steps, noise, cond, seeds=[0, 1, 2], clip=False)
        assert torch.isfinite(c).all() and not torch.allclose(c, b)
