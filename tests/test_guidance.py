"""Guided distillation's maths (method-spec §7): the guidance combination, one batched call, label
dropout, the w input that starts at zero, the stage-1 target, and one-line refusals."""
import pytest
import torch

from tests.conftest import tiny_gin
from tract_repro import launch
from tract_repro.common.batch_random import StepRandom
from tract_repro.common.errors import ConfigError, GuidanceRangeWarning
from tract_repro.diffusion.grid import TimeGrid
from tract_repro.diffusion.schedules import CosineSchedule
from tract_repro.methods import GuidedDistillation, TeacherTraining
from tract_repro.methods.base import Networks
from tract_repro.methods.phases import plan_phases
from tract_repro.networks.conditioning import NULL_LABEL, Cond
from tract_repro.networks.denoiser import VPDenoiser
from tract_repro.networks.guidance import GuidedDenoiser, guided
from tract_repro.networks.unet import UNet

NET = dict(in_channels=1, resolution=8, channels=8, emb_channels=16, channel_mult=(1, 2), num_res_blocks=1,
           attn_resolutions=(), norm_groups=4, num_classes=10, null_class=True)


def denoiser(extra=(), seed=0, **kw):
    torch.manual_seed(seed)
    net = UNet(**{**NET, **kw}, extra_conditions=extra)
    with torch.no_grad():  # away from the zero-initialised output layer, so that every input shows
        for name, p in net.named_parameters():
            if not name.startswith("cond_emb"):
                p.normal_(0.0, 0.2)
    return VPDenoiser(net, CosineSchedule(), "v").eval()


def batch(n=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, dtype=torch.float64, generator=g)
    logsnr = torch.linspace(-4, 4, n, dtype=torch.float64)
    labels = torch.randint(10, (n,), generator=g)
    w = torch.linspace(0, 4, n, dtype=torch.float64)
    return x, logsnr, labels, w


def test_the_guidance_combination_at_w_0_and_w_minus_1():
    xc, xu = torch.randn(3, 1, 2, 2, dtype=torch.float64), torch.randn(3, 1, 2, 2, dtype=torch.float64)
    assert torch.equal(guided(xc, xu, torch.zeros(3, dtype=torch.float64)), xc)  # w = 0: conditional
    assert torch.equal(guided(xc, xu, -torch.ones(3, dtype=torch.float64)), xu)  # w = −1: unconditional
    w = torch.tensor([0.5, 1.0, 4.0], dtype=torch.float64)
    torch.testing.assert_close(guided(xc, xu, w), xu + (1 + w.view(-1, 1, 1, 1)) * (xc - xu), rtol=0, atol=1e-12)


def test_one_batched_call_equals_two_separate_calls():
    D, (x, logsnr, labels, w) = denoiser(), batch()
    calls = []
    D.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    with torch.no_grad():
        out = GuidedDenoiser(D)(x, logsnr, Cond(labels, {"w": w}))
        assert calls == [12]  # one network call, on the doubled batch
        xc = D(x, logsnr, Cond(labels))
        xu = D(x, logsnr, Cond(torch.full_like(labels, NULL_LABEL)))
    torch.testing.assert_close(out, (1 + w.view(-1, 1, 1, 1)) * xc - w.view(-1, 1, 1, 1) * xu, rtol=0, atol=1e-5)
    assert not torch.allclose(xc, xu)  # the null class is a prediction of its own


def test_at_w_0_everywhere_the_guided_denoiser_is_the_conditional_one_in_one_undoubled_call():
    D, (x, logsnr, labels, w) = denoiser(), batch()
    calls = []
    D.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    with torch.no_grad():
        out = GuidedDenoiser(D)(x, logsnr, Cond(labels, {"w": torch.zeros_like(w)}))
        assert calls == [6]
        torch.testing.assert_close(out, D(x, logsnr, Cond(labels)), rtol=0, atol=0)
        GuidedDenoiser(D)(x, logsnr, Cond(labels, {"w": torch.where(torch.arange(6) == 2, 0.5, 0.0).double()}))
    assert calls[-1] == 12  # one w ≠ 0 in the batch: both halves


def test_a_network_without_a_null_class_is_refused_for_guidance():
    D, (x, logsnr, labels, w) = denoiser(null_class=False), batch()
    with pytest.raises(ConfigError, match="has no null class"):
        GuidedDenoiser(D)(x, logsnr, Cond(labels, {"w": w}))


def test_label_dropout_draws_per_sample_whatever_the_split():
    method, grid = TeacherTraining(p_uncond=0.25), TimeGrid(CosineSchedule(), 64)
    x = torch.zeros(64, 1, 8, 8, dtype=torch.float64)
    labels = torch.arange(64) % 10
    whole = method(x, Cond(labels), None, None, grid, StepRandom(torch.Generator().manual_seed(0), 64).slice())
    draws = StepRandom(torch.Generator().manual_seed(0), 64)
    halves = [method(x[a:b], Cond(labels[a:b]), None, None, grid, draws.slice(a, b)) for a, b in ((0, 32), (32, 64))]
    assert torch.equal(torch.cat([h.cond.labels for h in halves]), whole.cond.labels)
    dropped = (whole.cond.labels == NULL_LABEL)
    assert 0 < dropped.sum() < 64 and torch.equal(whole.cond.labels[~dropped], labels[~dropped])
    plain = TeacherTraining()(x, Cond(labels), None, None, grid, torch.Generator().manual_seed(0))
    assert torch.equal(plain.cond.labels, labels)  # p_uncond = 0: labels untouched, no extra draw
    with pytest.raises(ConfigError, match="p_uncond = 1.0"):
        TeacherTraining(p_uncond=1.0)


def test_a_new_w_input_starts_at_zero_so_the_student_equals_the_teacher_for_every_w():
    teacher, student = denoiser(), denoiser(extra=("w",))
    student.load_state_dict(teacher.state_dict(), strict=False)  # everything but the new w branch
    x, logsnr, labels, _ = batch()
    with torch.no_grad():
        expected = teacher(x, logsnr, Cond(labels))
        for w in (0.0, 0.5, 4.0, 100.0):
            got = student(x, logsnr, Cond(labels, {"w": torch.full((6,), w, dtype=torch.float64)}))
            assert torch.equal(got, expected)


def test_the_stage_1_target_is_the_guided_teacher_at_a_drawn_w():
    teacher, student = denoiser(), denoiser(extra=("w",))
    student.load_state_dict(teacher.state_dict(), strict=False)
    method, grid = GuidedDistillation(w_min=0.0, w_max=4.0), TimeGrid(CosineSchedule(), 64)
    x, _, labels, _ = batch()
    x = x.clamp(-1, 1)
    target = method(x, Cond(labels), plan_phases(method.steps(64), total=64)[0], Networks(teacher=student), grid,
                    torch.Generator().manual_seed(5))
    w = target.cond.extra["w"]
    assert w.shape == (6,) and bool(((0 <= w) & (w <= 4)).all()) and len(set(w.tolist())) == 6
    with torch.no_grad():
        xc = teacher(target.x_t, target.logsnr, Cond(labels))
        xu = teacher(target.x_t, target.logsnr, Cond(torch.full_like(labels, NULL_LABEL)))
    torch.testing.assert_close(target.x_target, guided(xc, xu, w), rtol=0, atol=1e-5)
    torch.testing.assert_close(target.weight, torch.exp(target.logsnr) + 1, rtol=0, atol=0)  # the teacher's own snr+1


GUIDED_TEACHER = tiny_gin("train.method = @TeacherTraining()\nTeacherTraining.sample_steps = 8\n"
                          "TeacherTraining.p_uncond = 0.2\ninference_ema_momentum.momentum = 0.9\n"
                          "UNet.num_classes = 10\nUNet.null_class = True", total=256)


def stage_1(teacher, total=64):
    return tiny_gin(f"train.method = @GuidedDistillation()\ntrain.teacher = '{teacher}'\nTeacherTraining.sample_steps = 8\n"
                    "inference_ema_momentum.momentum = 0.9\nUNet.num_classes = 10\nUNet.null_class = True\n"
                    "UNet.extra_conditions = ('w',)\nadam.lr = 0.0", total=total)


def test_stage_1_starts_from_the_guided_teacher_and_refuses_one_without_label_dropout(tmp_path, capsys):
    (tmp_path / "t.gin").write_text(GUIDED_TEACHER)
    assert launch.main([str(tmp_path / "t.gin"), "--workdir", str(tmp_path / "teacher")]) == 0
    (tmp_path / "s.gin").write_text(stage_1(tmp_path / "teacher"))
    assert launch.main([str(tmp_path / "s.gin"), "--workdir", str(tmp_path / "stage1")]) == 0
    teacher = torch.load(tmp_path / "teacher" / "ema.pt", weights_only=True)
    student = torch.load(tmp_path / "stage1" / "ema.pt", weights_only=True)
    assert all(torch.equal(student[k], v) for k, v in teacher.items())  # lr 0: the teacher's weights, bit for bit
    assert all(not v.any() for k, v in student.items() if k.startswith("net.cond_emb.w.2"))  # the w branch's zero layer
    plain = GUIDED_TEACHER.replace("TeacherTraining.p_uncond = 0.2", "")
    (tmp_path / "p.gin").write_text(plain)
    assert launch.main([str(tmp_path / "p.gin"), "--workdir", str(tmp_path / "plain")]) == 0
    capsys.readouterr()
    (tmp_path / "s2.gin").write_text(stage_1(tmp_path / "plain"))
    assert launch.main([str(tmp_path / "s2.gin"), "--workdir", str(tmp_path / "refused")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "was not trained with label dropout" in err and not (tmp_path / "refused").exists()


def test_guided_runs_need_labels_and_a_w_input(tmp_path, capsys):
    unconditional = GUIDED_TEACHER.replace("UNet.num_classes = 10\nUNet.null_class = True", "")
    (tmp_path / "u.gin").write_text(unconditional)
    assert launch.main([str(tmp_path / "u.gin"), "--workdir", str(tmp_path / "u")]) == 2
    assert "needs class labels" in capsys.readouterr().err and not (tmp_path / "u").exists()
    (tmp_path / "t.gin").write_text(GUIDED_TEACHER)
    assert launch.main([str(tmp_path / "t.gin"), "--workdir", str(tmp_path / "teacher")]) == 0
    capsys.readouterr()
    (tmp_path / "s.gin").write_text(stage_1(tmp_path / "teacher").replace("UNet.extra_conditions = ('w',)", ""))
    assert launch.main([str(tmp_path / "s.gin"), "--workdir", str(tmp_path / "s")]) == 2
    assert "UNet.extra_conditions = ('w',)" in capsys.readouterr().err


class Recording(torch.nn.Module):
    """x̂ = 0.9·x_t, whatever the conditioning; keeps the w of every call."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x, logsnr, cond=None):
        self.seen.append(None if cond is None or not hasattr(cond, "extra") else cond.extra.get("w"))
        return 0.9 * x


@pytest.mark.parametrize("name", ["BTD", "TRACT"])
def test_stage_2_targets_reduce_to_the_plain_ones_and_share_one_w(name):
    """With a teacher that ignores w, a w-drawing BTD/TRACT target equals the plain one (w is drawn after
    every other draw); each teacher and self-teacher call sees the rows' own w, and so does the student."""
    from tract_repro.methods import BTD, TRACT

    make = {"BTD": lambda **kw: BTD(start_steps=64, final_steps=8, **kw),
            "TRACT": lambda **kw: TRACT(schedule=(64, 8, 1), **kw)}[name]
    grid, x = TimeGrid(CosineSchedule(), 64), torch.rand(16, 1, 8, 8, dtype=torch.float64) * 2 - 1
    labels = torch.arange(16) % 10
    phase = plan_phases(make().steps(64), total=64 * len(make().steps(64)))[0]
    plain_nets, nets = Networks(Recording(), Recording()), Networks(Recording(), Recording())
    plain = make()(x, Cond(labels), phase, plain_nets, grid, torch.Generator().manual_seed(7))
    drawn = make(guidance=(0, 4))(x, Cond(labels), phase, nets, grid, torch.Generator().manual_seed(7))
    for field in ("x_t", "logsnr", "x_target", "weight"):
        assert torch.equal(getattr(plain, field), getattr(drawn, field)), field
    w = drawn.cond.extra["w"]
    assert bool(((0 <= w) & (w <= 4)).all()) and len(set(w.tolist())) == 16
    assert torch.equal(nets.teacher.seen[0], w)
    for seen in nets.self_teacher.seen:  # TRACT's self-teacher, on the rows whose group is not finished
        assert seen is not None and set(seen.tolist()) <= set(w.tolist())
    with pytest.raises(ConfigError, match="guidance = \\(4, 0\\)"):
        make(guidance=(4, 0))


def test_stage_2_distils_a_stage_1_student_and_refuses_a_teacher_without_w(tmp_path, capsys):
    (tmp_path / "t.gin").write_text(GUIDED_TEACHER)
    assert launch.main([str(tmp_path / "t.gin"), "--workdir", str(tmp_path / "teacher")]) == 0
    (tmp_path / "s.gin").write_text(stage_1(tmp_path / "teacher").replace("adam.lr = 0.0", ""))
    assert launch.main([str(tmp_path / "s.gin"), "--workdir", str(tmp_path / "stage1")]) == 0
    stage_2 = lambda teacher: tiny_gin(  # noqa: E731
        f"train.method = @TRACT()\nTRACT.schedule = (64, 8, 1)\nTRACT.guidance = (0, 4)\ntrain.teacher = '{teacher}'\n"
        "inference_ema_momentum.residual = 1e-3\nUNet.num_classes = 10\nUNet.null_class = True\n"
        "UNet.extra_conditions = ('w',)", total=128)
    (tmp_path / "d.gin").write_text(stage_2(tmp_path / "stage1"))
    assert launch.main([str(tmp_path / "d.gin"), "--workdir", str(tmp_path / "stage2")]) == 0
    assert (tmp_path / "stage2" / "samples" / "final_1steps.png").is_file()
    capsys.readouterr()
    (tmp_path / "n.gin").write_text(stage_2(tmp_path / "teacher"))
    assert launch.main([str(tmp_path / "n.gin"), "--workdir", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "has no w input: distil guidance into it first" in err


def test_evaluation_at_guidance_weights(tmp_path, capsys):
    """evaluate --w: a guided teacher is sampled through x̂^w (two network calls a step), a w-conditioned
    student with w as its input; class-conditional rows get class accuracy and a digits-IS; a run that takes
    no w is refused in one line, and a w outside the student's training range is warned about."""
    from tract_repro import evaluate
    from tract_repro.evaluation.classifier import train_classifier

    train_classifier(tmp_path / "clf", epochs=3, min_accuracy=0.5)
    (tmp_path / "t.gin").write_text(GUIDED_TEACHER)
    assert launch.main([str(tmp_path / "t.gin"), "--workdir", str(tmp_path / "teacher")]) == 0
    (tmp_path / "s.gin").write_text(stage_1(tmp_path / "teacher").replace("adam.lr = 0.0", ""))
    assert launch.main([str(tmp_path / "s.gin"), "--workdir", str(tmp_path / "stage1")]) == 0
    common = ["--samples", "40", "--classifier", str(tmp_path / "clf"), "--cache", str(tmp_path / "cache"),
              "--reference-steps", "8"]
    capsys.readouterr()
    assert evaluate.main([str(tmp_path / "teacher"), "--steps", "8", "2", "--w", "0", "2", *common]) == 0
    rows = __import__("json").loads((tmp_path / "teacher" / "eval" / "metrics.json").read_text())["results"]
    assert [(r["w"], r["steps"], r["nfe"]) for r in rows] == [(0, 8, 16), (0, 2, 4), (2, 8, 16), (2, 2, 4)]
    assert all(0 <= r["class_accuracy"] <= 1 and 1 <= r["digits_is"] <= 10 for r in rows)
    assert rows[0]["fidelity_rmse"] == 0 and rows[2]["fidelity_rmse"] == 0  # its own guided reference at each w
    assert (tmp_path / "teacher" / "eval" / "samples_2steps_w2.png").is_file()
    per_w = tmp_path / "per_w" / "s0_w{w}.json"  # one metrics file (and class grid) per guidance weight
    assert evaluate.main([str(tmp_path / "teacher"), "--steps", "2", "--w", "0", "2", "--out", str(per_w), *common]) == 0
    for w, row in ((0, rows[1]), (2, rows[3])):
        mine = __import__("json").loads((tmp_path / "per_w" / f"s0_w{w}.json").read_text())["results"]
        assert mine == [row] and (tmp_path / "per_w" / f"s0_w{w}_2steps_w{w}_classes.png").is_file()
    assert evaluate.main([str(tmp_path / "teacher"), "--steps", "2", "--out", str(per_w), *common]) == 2
    with pytest.warns(GuidanceRangeWarning, match="it never saw w = 5"):
        assert evaluate.main([str(tmp_path / "stage1"), "--steps", "2", "--w", "1", "5", *common]) == 0
    assert "w 1  accuracy" in capsys.readouterr().out
    plain = GUIDED_TEACHER.replace("TeacherTraining.p_uncond = 0.2", "")
    (tmp_path / "p.gin").write_text(plain)
    assert launch.main([str(tmp_path / "p.gin"), "--workdir", str(tmp_path / "plain")]) == 0
    capsys.readouterr()
    assert evaluate.main([str(tmp_path / "plain"), "--steps", "2", "--w", "1", *common]) == 2
    assert "takes no guidance weight" in capsys.readouterr().err


def test_a_w_student_sampled_without_w_is_one_line(tmp_path, capsys):
    from tract_repro import evaluate

    (tmp_path / "t.gin").write_text(GUIDED_TEACHER)
    assert launch.main([str(tmp_path / "t.gin"), "--workdir", str(tmp_path / "teacher")]) == 0
    (tmp_path / "s.gin").write_text(stage_1(tmp_path / "teacher"))
    assert launch.main([str(tmp_path / "s.gin"), "--workdir", str(tmp_path / "stage1")]) == 0
    capsys.readouterr()
    assert evaluate.main([str(tmp_path / "stage1"), "--steps", "2", "--samples", "8", "--classifier", str(tmp_path / "none"),
                          "--cache", str(tmp_path / "cache")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "takes a guidance weight w as an input: evaluate it with --w" in err


def test_a_guided_stage_1_run_killed_and_resumed_ends_bit_identical(tmp_path):
    """SIGKILL of a stage-1 run held at a data gate, then the same command: the weights of an uninterrupted run."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    (tmp_path / "t.gin").write_text(GUIDED_TEACHER)
    assert launch.main([str(tmp_path / "t.gin"), "--workdir", str(tmp_path / "teacher")]) == 0
    text = stage_1(tmp_path / "teacher", total=512).replace("adam.lr = 0.0", "") + "train.checkpoint_every = 128\n"
    (tmp_path / "s.gin").write_text(text)
    assert launch.main([str(tmp_path / "s.gin"), "--workdir", str(tmp_path / "straight")]) == 0
    gate = tmp_path / "gate"
    gated = text + (f"import tests.gated_data\ntrain.dataset = @gated_digits\ngated_digits.gate = '{gate}'\n"
                    "gated_digits.after = 12\n")
    (tmp_path / "g.gin").write_text(gated)
    cmd = [sys.executable, "-m", "tract_repro.launch", str(tmp_path / "g.gin"), "--workdir", str(tmp_path / "killed")]
    proc = subprocess.Popen(cmd, cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    checkpoint = tmp_path / "killed" / "checkpoints" / "ckpt_000000000128.pt.sha256"
    deadline = time.monotonic() + 300
    while not checkpoint.is_file():  # the run then waits at the gate after its 12th batch
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-2000:]
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    gate.touch()
    again = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    a = torch.load(tmp_path / "straight" / "ema.pt", weights_only=True)
    b = torch.load(tmp_path / "killed" / "ema.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
