"""TRACT and BTD on EDM (VE) teachers through the same methods, loop, launcher and evaluation."""
import json

import torch

from tract_repro import launch
from tract_repro.diffusion.ddim import ddim_step
from tract_repro.diffusion.edm import EDMSchedule
from tract_repro.diffusion.grid import TimeGrid
from tract_repro.evaluation.metrics import evaluate_run
from tract_repro.evaluation.classifier import train_classifier
from tract_repro.methods import BTD, TRACT
from tract_repro.methods.base import Networks
from tract_repro.sampling.heun import heun_teacher_step
from tract_repro.methods.phases import plan_phases
from tract_repro.methods.tract import tract_indices

GRID = TimeGrid(EDMSchedule(), 40)


def fake_D(scale):
    def D(x, logsnr, labels=None):
        return scale * torch.tanh(x / (1 + torch.exp(-logsnr / 2).view(-1, 1, 1, 1)))
    return D


def test_tract_edm_target_is_the_teacher_D_at_the_smallest_sigma():
    S = (40, 8, 1)
    method = TRACT(schedule=S, teacher_step=heun_teacher_step, weighting="edm")
    gen = torch.Generator().manual_seed(0)
    state = gen.get_state()
    x = torch.rand((4000, 1, 4, 4), generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 2 - 1
    teacher, self_teacher = fake_D(1.3), fake_D(0.7)
    target = method(x, None, plan_phases(S, per_phase=[1, 1])[0], Networks(teacher, self_teacher), GRID, gen)
    gen.set_state(state)
    t, t1, ti = tract_indices(S, 0, 40, 4000, gen)
    first = t == 1  # σ_a = σ_min: the Heun step to σ = 0 is Euler, which lands on D
    assert first.any()
    torch.testing.assert_close(target.x_target[first], teacher(target.x_t, target.logsnr)[first], rtol=0, atol=1e-12)
    # elsewhere, one unclipped DDIM-VE step with x̃ from σ_t to σ_ti lands on Heun (t→t₁) + self-teacher DDIM-VE (t₁→ti)
    b = int(torch.nonzero((t1 != ti) & (t > 1))[0])
    i = torch.tensor([b])
    x_t1, _ = heun_teacher_step(teacher, target.x_t[i], t[i], t1[i], GRID)
    l1, a1, s1 = GRID.at(t1[i])
    _, ai, si = GRID.at(ti[i])
    x_ti = ddim_step(x_t1, self_teacher(x_t1, l1), a1, s1, ai, si, clip=True)
    _, at, st = GRID.at(t[i])
    torch.testing.assert_close(ddim_step(target.x_t[i], target.x_target[i], at, st, ai, si), x_ti, rtol=0, atol=1e-9)
    sigma = torch.exp(-target.logsnr / 2)
    torch.testing.assert_close(target.weight, (sigma**2 + 0.25) / (sigma * 0.5) ** 2)  # EDM's λ(σ)


def test_btd_edm_halves_with_heun_teacher_steps():
    method = BTD(start_steps=8, teacher_step=heun_teacher_step, weighting="edm")
    grid = TimeGrid(EDMSchedule(), 8)
    x = torch.rand((64, 1, 4, 4), generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 2 - 1
    phase = plan_phases(method.steps(8), per_phase=[1, 1, 1])[2]  # 2 → 1: the only student step ends at σ = 0
    target = method(x, None, phase, Networks(fake_D(1.1)), grid, torch.Generator().manual_seed(3))
    x_mid, _ = heun_teacher_step(fake_D(1.1), target.x_t, torch.full((64,), 8), torch.full((64,), 4), grid)
    torch.testing.assert_close(target.x_target, fake_D(1.1)(x_mid, grid.logsnr[torch.full((64,), 4)]), rtol=0, atol=1e-12)


EDM_BASE = """
train.dataset = @digits
train.network = @edm_digits_tiny
train.schedule = @EDMSchedule
train.parameterisation = 'edm'
train.batch_size = 16
train.threads = 1
train.grad_clip = 0
train.log_every = 32
train.checkpoint_every = 64
train.grid_size = 4
train.grid_max_steps = 8
adam.lr = 1e-3
"""


def test_edm_teacher_tract_edm_and_btd_edm_end_to_end(tmp_path):
    files = {
        "teacher.gin": EDM_BASE + "train.T = 40\ntrain.total = 96\ntrain.method = @TeacherTraining()\n"
                       "TeacherTraining.weighting = 'edm'\nTeacherTraining.time_distribution = 'lognormal'\n"
                       "TeacherTraining.sample_steps = 8\ninference_ema_momentum.momentum = 0.9\n",
        "tract.gin": EDM_BASE + f"train.T = 40\ntrain.total = 128\ntrain.teacher = '{tmp_path / 'teacher'}'\n"
                     "train.method = @TRACT()\nTRACT.schedule = (40, 8, 1)\nTRACT.teacher_step = @heun_teacher_step\n"
                     "TRACT.weighting = 'edm'\ninference_ema_momentum.residual = 1e-3\n",
        "btd.gin": EDM_BASE + f"train.T = 8\ntrain.total = 96\ntrain.teacher = '{tmp_path / 'teacher'}'\n"
                   "train.method = @BTD()\nBTD.start_steps = 8\nBTD.teacher_step = @heun_teacher_step\n"
                   "BTD.weighting = 'edm'\ninference_ema_momentum.residual = 1e-3\n",
    }
    for name, text in files.items():
        (tmp_path / name).write_text(text)
        assert launch.main([str(tmp_path / name), "--workdir", str(tmp_path / name[:-4])]) == 0, name
    tract = json.loads((tmp_path / "tract" / "run.json").read_text())
    assert tract["noise_schedule"] == "EDMSchedule" and tract["schedule_steps"] == [40, 8, 1]
    assert tract["final_student_steps"] == 1 and len(tract["teacher_sha256"]) == 64
    assert json.loads((tmp_path / "btd" / "run.json").read_text())["schedule_steps"] == [8, 4, 2, 1]
    train_classifier(tmp_path / "clf", epochs=2, min_accuracy=0.3)
    common = dict(samples=16, classifier=tmp_path / "clf", reference_steps=8, cache=tmp_path / "cache")
    student = evaluate_run(tmp_path / "tract", steps=(1,), out=tmp_path / "tract.json", **common)
    heun = evaluate_run(tmp_path / "teacher", steps=(3,), sampler="heun", out=tmp_path / "teacher.json", **common)
    assert heun["results"][0]["nfe"] == 5 and heun["sampler"].startswith("heun")
    assert student["reference"]["run"] == str(tmp_path / "teacher")
    assert all(r["digits_fd"] > 0 for r in student["results"] + heun["results"])
