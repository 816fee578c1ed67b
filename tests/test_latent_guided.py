"""Guided distillation's w input on diffusers UNets (diffusers_network.time_cond_proj_dim), on the tiny real
components of tests/tiny_diffusers.py: e(w) is the latent consistency pipelines' embedding, a w student built from a
folder is its teacher exactly at every w until its cond_proj moves, teacher weights load into it (and what does not
fit is refused in one line), its frozen copy gives the guided teacher's stage-1 target, and stage 1 runs through
launch."""
import json
import shutil

import pytest
import torch

from tests import tiny_diffusers as tiny
from tests.test_latent_engine import CPU_RUN, SCHEDULE, TEXT, inputs, launch, one_line
from tract_repro.diffusion.grid import TimeGrid
from tract_repro.methods import GuidedDistillation
from tract_repro.methods.base import Networks
from tract_repro.networks.conditioning import NULL_LABEL, Cond
from tract_repro.networks.denoiser import VPDenoiser
from tract_repro.networks.diffusers_net import diffusers_network, from_config, guidance_embedding, load_folder
from tract_repro.training import checkpoint as ckpt
from tract_repro.training import teacher as teachers

D = 32  # the tiny students' time_cond_proj_dim
W = [0.0, 0.5, 1.0, 2.5, 4.0]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("diffusers")
    return dict(text=tiny.stable_diffusion_folder(root / "sd"), classes=tiny.class_conditional_folder(root / "classes"))


def labels_of(kind):
    return torch.tensor([1, 4, NULL_LABEL, 9]) if kind == "classes" else torch.tensor([0, NULL_LABEL, 0, 0])


def perturb(net, skip=()):
    """Move every weight of ``net`` a little, except those whose names start with ``skip``."""
    with torch.no_grad():
        for name, p in net.named_parameters():
            if not name.startswith(skip):
                p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    return net


def test_the_guidance_embedding_is_the_latent_consistency_pipelines():
    from diffusers import LatentConsistencyModelPipeline

    w = torch.tensor([0.0, 0.25, 1.0, 2.5, 4.0, 7.5, 14.0], dtype=torch.float64)
    for dim in (4, 5, 32, 256, 257):
        theirs = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, w, dim)
        ours = guidance_embedding(w, dim)
        assert ours.dtype == theirs.dtype == torch.float32 and ours.shape == (len(w), dim)
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    half = 128  # the maths of the docstring, in float64
    k = torch.arange(half, dtype=torch.float64)
    angles = 1000 * w[:, None] * 10000 ** (-k / (half - 1))
    torch.testing.assert_close(guidance_embedding(w, 256).double(), torch.cat([angles.sin(), angles.cos()], 1),
                               rtol=0, atol=2e-3)  # float32 angles up to 1.4e4 rad


@pytest.mark.parametrize("kind", ["text", "classes"])
def test_a_w_student_from_a_folder_is_its_teacher_exactly_at_every_w(folders, kind):
    teacher, student = load_folder(folders[kind]), diffusers_network(folder=folders[kind], time_cond_proj_dim=D)
    assert (teacher.extra_conditions, student.extra_conditions) == ((), ("w",))
    proj = student.model.time_embedding.cond_proj
    assert proj.weight.shape == (student.model.time_embedding.linear_1.in_features, D) and proj.bias is None
    assert not proj.weight.any() and student.model.config.time_cond_proj_dim == D and not student.model.training
    own = teacher.state_dict()
    assert all(torch.equal(v, own[k]) for k, v in student.state_dict().items() if "cond_proj" not in k)
    x, extra = inputs(text=kind == "text")
    logsnr = SCHEDULE.grid(16)[[1, 5, 9, 16]]
    with torch.no_grad():
        reference = teacher(x.float(), logsnr, labels_of(kind), extra)
        for w in W:
            out = student(x.float(), logsnr, labels_of(kind), {**extra, "w": torch.full((4,), w, dtype=torch.float64)})
            assert torch.equal(out, reference), w
        mixed = student(x.float(), logsnr, labels_of(kind), {**extra, "w": torch.tensor(W[:4], dtype=torch.float64)})
        assert torch.equal(mixed, reference)


@pytest.mark.parametrize("kind", ["text", "classes"])
def test_the_w_input_is_wired_once_cond_proj_moves(folders, kind):
    """After perturbing cond_proj alone, F depends on w, and it is diffusers' own UNet fed timestep_cond = e(w)."""
    student = diffusers_network(folder=folders[kind], time_cond_proj_dim=D)
    with torch.no_grad():
        student.model.time_embedding.cond_proj.weight.normal_(generator=torch.Generator().manual_seed(1))
    x, extra = inputs(text=kind == "text")
    logsnr = SCHEDULE.grid(16)[[1, 5, 9, 16]]
    labels = labels_of(kind)
    with torch.no_grad():
        outs = [student(x.float(), logsnr, labels, {**extra, "w": torch.full((4,), w)}) for w in (0.0, 1.0, 4.0)]
        assert not torch.allclose(outs[0], outs[1]) and not torch.allclose(outs[1], outs[2])
        w = torch.full((4,), 1.0)
        context = extra["text"].clone() if kind == "text" else torch.zeros(4, 1, tiny.TEXT_WIDTH)
        if kind == "text":
            context[1] = student.empty_text[0]
        raw = student.model(x.float(), SCHEDULE.timestep(logsnr).float(), encoder_hidden_states=context,
                            class_labels=torch.tensor([1, 4, 10, 9]) if kind == "classes" else None,
                            timestep_cond=guidance_embedding(w, D)).sample
        torch.testing.assert_close(outs[1], raw, rtol=0, atol=0)
    one_line(lambda: student(x.float(), logsnr, labels, extra), "takes a guidance weight w", "evaluate --w")
    plain = load_folder(folders[kind])
    one_line(lambda: plain(x.float(), logsnr, labels, {**extra, "w": w}), "not ['w']")


def test_time_cond_proj_dim_that_cannot_be_added_is_refused_in_one_line(folders, tmp_path):
    one_line(lambda: load_folder(folders["classes"], time_cond_proj_dim=2), "time_cond_proj_dim = 2", "≥ 4")
    one_line(lambda: load_folder(folders["classes"], time_cond_proj_dim=True), "integer")
    lcm = tmp_path / "lcm"
    tiny.unet(num_class_embeds=11, time_cond_proj_dim=D).save_pretrained(lcm / "unet", safe_serialization=True)
    for name in ("vae", "scheduler"):
        shutil.copytree(folders["classes"] / name, lcm / name)
    shutil.copy(folders["classes"] / "model_index.json", lcm)
    taken = load_folder(lcm)  # a folder whose UNet already takes w: as it is, its cond_proj not zeroed
    assert taken.extra_conditions == ("w",) and taken.model.time_embedding.cond_proj.weight.any()
    one_line(lambda: load_folder(lcm, time_cond_proj_dim=D), "already takes w", "leave", "unset")
    config = dict(tiny.unet(num_class_embeds=11).config)
    for given in (config, {k: v for k, v in config.items() if k != "time_cond_proj_dim"}):  # as a gin config says it
        fresh = diffusers_network(config=given, time_cond_proj_dim=D)
        assert fresh.extra_conditions == ("w",) and fresh.model.config.time_cond_proj_dim == D
        assert not fresh.model.time_embedding.cond_proj.weight.any()
    dit = {"_class_name": "DiTTransformer2DModel", "sample_size": 8, "in_channels": 4, "num_layers": 1,
           "attention_head_dim": 8, "num_attention_heads": 2, "patch_size": 2, "num_embeds_ada_norm": 10}
    # a DiT takes the same knob (tests/test_latent_dit_w.py)
    assert from_config(dit, None, SCHEDULE, time_cond_proj_dim=D).extra_conditions == ("w",)


def save_run(denoiser, path, **info):
    """``denoiser``'s weights as a finished run (ema.pt, run.json) that load_into reads."""
    ckpt.save_atomic(denoiser.state_dict(), path / "ema.pt")
    (path / "run.json").write_text(json.dumps(dict(status="complete", parameterisation="eps",
                                                   noise_schedule="DiscreteSchedule", **info)))
    return path


@pytest.mark.parametrize("kind", ["text", "classes"])
def test_teacher_weights_load_into_a_w_student_and_mismatches_are_refused_in_one_line(folders, tmp_path, kind):
    folder = folders[kind]
    teacher = VPDenoiser(load_folder(folder), SCHEDULE, "eps")
    run = save_run(VPDenoiser(perturb(load_folder(folder)), SCHEDULE, "eps"), tmp_path, p_uncond=0.1)
    fresh = "net.model.time_embedding.cond_proj."
    for spec, source in ((folder, teacher.state_dict()), (run, ckpt.load(run / "ema.pt"))):
        student = VPDenoiser(perturb(diffusers_network(folder=folder, time_cond_proj_dim=D), skip=("model.time_embedding.cond_proj",)),
                             SCHEDULE, "eps")
        teachers.load_into(student, spec, expect=dict(parameterisation="eps"), new_inputs=("w",), guided=True)
        state = student.state_dict()
        assert state.keys() - source.keys() == {fresh + "weight"} and not state[fresh + "weight"].any()
        assert all(torch.equal(state[k], v) for k, v in source.items())
    assert teachers.fresh_prefixes(student.net, ("w",)) == (fresh,)

    stage_1 = save_run(student, tmp_path / "stage1", guided=True)  # a w student's run loads into a w student as is
    again = VPDenoiser(diffusers_network(folder=folder, time_cond_proj_dim=D), SCHEDULE, "eps")
    teachers.load_into(again, stage_1)
    assert all(torch.equal(v, state[k]) for k, v in again.state_dict().items())
    refusals = [
        (lambda: teachers.load_into(again, run), ["has no w input", "GuidedDistillation", "unset diffusers_network.time_cond_proj_dim"]),
        (lambda: teachers.load_into(VPDenoiser(load_folder(folder), SCHEDULE, "eps"), stage_1), ["does not fit", "1 unexpected"]),
        (lambda: teachers.load_into(VPDenoiser(diffusers_network(folder=folder, time_cond_proj_dim=2 * D), SCHEDULE, "eps"),
                                    stage_1), ["does not fit", "1 mis-shaped"]),
    ]
    for call, words in refusals:
        one_line(call, *words)


@pytest.mark.parametrize("kind", ["text", "classes"])
def test_the_stage_1_target_of_a_w_students_frozen_copy_is_the_guided_folder_teacher(folders, kind):
    """GuidedDistillation's x̃ = x̂^w from the frozen copy of a fresh w student (w passed on, its branch zero) equals
    x̂^w of the folder teacher without w, bit for bit (the guided denoiser itself: test_latent_engine)."""
    plain = VPDenoiser(load_folder(folders[kind]), SCHEDULE, "eps").eval()
    copy = VPDenoiser(diffusers_network(folder=folders[kind], time_cond_proj_dim=D), SCHEDULE, "eps").eval()
    x, extra = inputs(n=4, seed=2, text=kind == "text")
    cond = Cond(labels_of(kind), extra)
    method, grid = GuidedDistillation(w_min=0.0, w_max=4.0), TimeGrid(SCHEDULE, 64)
    targets = []
    for teacher in (plain, copy):
        with torch.no_grad():
            targets.append(method(x, cond, None, Networks(teacher), grid, torch.Generator().manual_seed(5)))
    a, b = targets
    assert torch.equal(a.x_target, b.x_target) and torch.equal(a.x_t, b.x_t) and torch.equal(a.cond.extra["w"], b.cond.extra["w"])
    assert bool(a.cond.extra["w"].gt(0).all())


#: a tiny latent run of the folder's UNet with a w input (time_cond_proj_dim = {dim}); the method comes after it
W_STUDENT = """
import tests.tiny_latents
train.dataset = @tiny_latents
tiny_latents.n = 16
train.network = @diffusers_network
diffusers_network.folder = '{folder}'
diffusers_network.time_cond_proj_dim = {dim}
train.schedule = @diffusers_schedule
diffusers_schedule.folder = '{folder}'
train.T = 64
train.parameterisation = 'eps'
"""

STAGE_1 = W_STUDENT + """train.method = @GuidedDistillation()
train.teacher = '{folder}'
TeacherTraining.sample_steps = 4
train.batch_size = 4
train.total = 12
train.checkpoint_every = 8
""" + CPU_RUN


def test_stage_1_of_a_class_conditional_diffusers_student_runs_through_launch(folders, tmp_path):
    """train.teacher = the folder, the student the folder's UNet with a w input: it trains, learns a w branch, and
    its run is rebuilt with that input."""
    from tract_repro.evaluation.runs import load_run

    gin_file = tmp_path / "stage1.gin"
    gin_file.write_text(STAGE_1.format(folder=folders["classes"], dim=D))
    done = launch(gin_file, tmp_path / "run")
    assert done.returncode == 0, done.stderr[-3000:]
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert (info["status"], info["method"], info["guided"], info["w_range"]) == ("complete", "GuidedDistillation", True, [0.0, 4.0])
    ema = ckpt.load(tmp_path / "run" / "ema.pt")
    assert ema["net.model.time_embedding.cond_proj.weight"].any()  # the w branch was trained
    run = load_run(tmp_path / "run")
    assert run.denoiser.net.extra_conditions == ("w",)
    x, _ = inputs(text=False)
    with torch.no_grad():
        out = run.denoiser(x, SCHEDULE.grid(64)[[1, 20, 40, 64]], Cond(torch.tensor([1, 2, 3, 4]), {"w": torch.full((4,), 2.0)}))
    assert torch.isfinite(out).all()


def test_stage_1_of_a_text_to_image_diffusers_student_runs_through_launch(folders, tmp_path):
    """The same with captions: the text folder's UNet with a w input distils its own guided x̂^w (∅ the empty prompt)."""
    gin_file = tmp_path / "stage1.gin"
    gin_file.write_text(STAGE_1.format(folder=folders["text"], dim=D) + f"tiny_latents.text_shape = {TEXT}\n")
    done = launch(gin_file, tmp_path / "run")
    assert done.returncode == 0, done.stderr[-3000:]
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert (info["status"], info["method"], info["guided"]) == ("complete", "GuidedDistillation", True)
    assert ckpt.load(tmp_path / "run" / "ema.pt")["net.model.time_embedding.cond_proj.weight"].any()
