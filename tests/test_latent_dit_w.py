"""Guided distillation's w input on a class-conditional DiT (diffusers_network.time_cond_proj_dim), on the tiny DiT
folder of tests/test_latent_dit.py: each CombinedTimestepLabelEmbeddings gets a zero, bias-free cond_proj whose
cond_proj(e(w)) joins the timestep features, so a w student built from the folder is its teacher exactly at every w
until cond_proj moves; w is given per call (none is left between calls, and a call without it is refused); teacher
weights load into it leaving only cond_proj fresh; and stage 1 runs through launch."""
import json

import pytest
import torch

from tests.test_latent_dit import DIT_SCHEDULE, dit_folder, inputs
from tests.test_latent_engine import launch, one_line
from tests.test_latent_guided import STAGE_1, perturb, save_run
from tract_repro.networks.conditioning import NULL_LABEL, Cond
from tract_repro.networks.denoiser import VPDenoiser
from tract_repro.networks.diffusers_net import (GuidedLabels, diffusers_network, from_config, guidance_embedding,
                                                load_folder, with_w_input)
from tract_repro.training import checkpoint as ckpt
from tract_repro.training import teacher as teachers

D = 32  # the tiny students' time_cond_proj_dim
W = [0.0, 0.5, 1.0, 2.5, 4.0, 14.0]
LABELS = torch.tensor([1, 4, NULL_LABEL, 9])  # ∅ is the DiT's null class row


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return dit_folder(tmp_path_factory.mktemp("dit") / "dit")


@pytest.fixture(scope="module")
def teacher(folder):
    return load_folder(folder)


def embeddings(model):
    from diffusers.models.embeddings import CombinedTimestepLabelEmbeddings

    return [(name, m) for name, m in model.named_modules() if isinstance(m, CombinedTimestepLabelEmbeddings)]


def logsnrs():
    return DIT_SCHEDULE.grid(16)[[1, 5, 9, 16]]


def w_of(value):
    return {"w": torch.full((4,), value, dtype=torch.float64)}


def test_a_dit_w_student_from_the_folder_is_its_teacher_exactly_at_every_w(folder, teacher):
    student = diffusers_network(folder=folder, time_cond_proj_dim=D)
    assert (teacher.extra_conditions, student.extra_conditions) == ((), ("w",))
    assert not student.is_unet and not student.model.training
    found = embeddings(student.model)
    assert [name for name, _ in found] == ["transformer_blocks.0.norm1.emb", "transformer_blocks.1.norm1.emb"]
    for _, emb in found:
        proj = emb.cond_proj
        assert proj.weight.shape == (emb.time_proj.num_channels, D) == (256, D) and proj.bias is None
        assert not proj.weight.any()
    x, logsnr = inputs().float(), logsnrs()
    with torch.no_grad():
        reference = teacher(x, logsnr, LABELS)
        for w in W:
            assert torch.equal(student(x, logsnr, LABELS, w_of(w)), reference), w
        mixed = student(x, logsnr, LABELS, {"w": torch.tensor([0.0, 2.5, 14.0, 0.5], dtype=torch.float64)})
        assert torch.equal(mixed, reference)


def test_the_w_branch_is_wired_once_cond_proj_moves_and_zero_restores_the_teacher(folder, teacher):
    student = diffusers_network(folder=folder, time_cond_proj_dim=D)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, emb in embeddings(student.model):
            emb.cond_proj.weight.normal_(generator=g)
    x, logsnr = inputs().float(), logsnrs()
    with torch.no_grad():
        reference = teacher(x, logsnr, LABELS)
        outs = [student(x, logsnr, LABELS, w_of(w)) for w in (0.0, 1.0, 4.0)]
        assert not torch.allclose(outs[1], reference) and not torch.allclose(outs[1], outs[2])
        assert not torch.allclose(outs[0], outs[1])
        # each sample sees its own w: a mixed batch is the rows of the single-w calls
        mixed = student(x, logsnr, LABELS, {"w": torch.tensor([0.0, 1.0, 4.0, 1.0], dtype=torch.float64)})
        for row, k in enumerate([0, 1, 2, 1]):
            torch.testing.assert_close(mixed[row], outs[k][row], rtol=0, atol=1e-5)
        # the same numbers as the raw model given the labels with e(w) (∅ → row 10, σ channels dropped)
        raw = student.model(x, DIT_SCHEDULE.timestep(logsnr).float(),
                            class_labels=GuidedLabels(torch.tensor([1, 4, 10, 9]), guidance_embedding(torch.ones(4), D)),
                            return_dict=False)[0][:, :4]
        assert torch.equal(outs[1], raw)
        for _, emb in embeddings(student.model):
            emb.cond_proj.weight.zero_()
        assert all(torch.equal(student(x, logsnr, LABELS, w_of(w)), reference) for w in (0.0, 4.0))


def test_the_w_branch_trains_under_gradient_checkpointing(folder):
    """w travels with the labels, so the checkpointed blocks' recomputation in backward sees it too."""
    x, logsnr = inputs().float(), logsnrs()
    grads = []
    for checkpointing in (False, True):
        student = diffusers_network(folder=folder, time_cond_proj_dim=D, gradient_checkpointing=checkpointing).train()
        student(x, logsnr, LABELS, w_of(2.5)).square().sum().backward()
        grads.append([emb.cond_proj.weight.grad for _, emb in embeddings(student.model)])
    assert all(g.any() for g in grads[0])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_the_state_dict_is_the_teachers_and_one_cond_proj_per_embedding(folder, teacher):
    student = diffusers_network(folder=folder, time_cond_proj_dim=D)
    own, theirs = student.state_dict(), teacher.state_dict()
    new = {f"model.{name}.cond_proj.weight" for name, _ in embeddings(student.model)}
    assert len(new) == len(embeddings(teacher.model)) == 2
    assert own.keys() == theirs.keys() | new and not theirs.keys() & new
    assert all(torch.equal(own[k], v) for k, v in theirs.items())
    assert student.fresh_prefixes(("w",)) == tuple(k[:-len("weight")] for k in sorted(new))
    assert teacher.fresh_prefixes(("w",)) == () and student.fresh_prefixes(()) == ()


def test_what_cannot_work_is_refused_in_one_line(folder, teacher):
    student = diffusers_network(folder=folder, time_cond_proj_dim=D)
    x, logsnr = inputs().float(), logsnrs()
    one_line(lambda: student(x, logsnr, LABELS), "takes a guidance weight w", "evaluate --w")
    one_line(lambda: student.model(x, DIT_SCHEDULE.timestep(logsnr).float(), class_labels=torch.tensor([1, 4, 10, 9])),
             "guidance weight w", "diffusers_network.time_cond_proj_dim")
    one_line(lambda: teacher(x, logsnr, LABELS, w_of(1.0)), "not ['w']")
    one_line(lambda: load_folder(folder, time_cond_proj_dim=2), "time_cond_proj_dim = 2", "≥ 4")
    one_line(lambda: load_folder(folder, time_cond_proj_dim=True), "integer")
    one_line(lambda: with_w_input(student.model, D, "the student"), "already takes w", "leave",
             "diffusers_network.time_cond_proj_dim unset")
    config = {"_class_name": "DiTTransformer2DModel", "sample_size": 8, "in_channels": 4, "num_layers": 1,
              "attention_head_dim": 8, "num_attention_heads": 2, "patch_size": 2, "num_embeds_ada_norm": 10}
    fresh = from_config(config, None, DIT_SCHEDULE, time_cond_proj_dim=D)  # a DiT from a gin config gets it too
    assert fresh.extra_conditions == ("w",) and len(embeddings(fresh.model)) == 1
    assert not embeddings(fresh.model)[0][1].cond_proj.weight.any()


def test_teacher_weights_load_into_a_dit_w_student_leaving_only_cond_proj_fresh(folder, teacher, tmp_path):
    run = save_run(VPDenoiser(perturb(load_folder(folder)), DIT_SCHEDULE, "eps"), tmp_path / "teacher", p_uncond=0.1)
    source = ckpt.load(run / "ema.pt")
    for spec, expected in ((folder, {f"net.{k}": v for k, v in teacher.state_dict().items()}), (run, source)):
        student = VPDenoiser(perturb(diffusers_network(folder=folder, time_cond_proj_dim=D), skip=("model.transformer_blocks",)),
                             DIT_SCHEDULE, "eps")
        teachers.load_into(student, spec, expect=dict(parameterisation="eps"), new_inputs=("w",), guided=True)
        state = student.state_dict()
        fresh = teachers.fresh_prefixes(student.net, ("w",))
        assert len(fresh) == 2 and all(p.startswith("net.model.transformer_blocks.") for p in fresh)
        assert state.keys() - expected.keys() == {p + "weight" for p in fresh}
        assert all(not state[p + "weight"].any() for p in fresh)
        assert all(torch.equal(state[k], v) for k, v in expected.items())
    one_line(lambda: teachers.load_into(VPDenoiser(diffusers_network(folder=folder, time_cond_proj_dim=D), DIT_SCHEDULE,
                                                   "eps"), run),
             "has no w input", "GuidedDistillation", "unset diffusers_network.time_cond_proj_dim")


def test_stage_1_of_a_dit_w_student_runs_through_launch(folder, teacher, tmp_path):
    from tract_repro.evaluation.runs import load_run

    run = save_run(VPDenoiser(load_folder(folder), DIT_SCHEDULE, "eps"), tmp_path / "teacher", p_uncond=0.1)
    student = VPDenoiser(diffusers_network(folder=folder, time_cond_proj_dim=D), DIT_SCHEDULE, "eps")
    teachers.load_into(student, run, expect=dict(parameterisation="eps"), new_inputs=("w",), guided=True)
    own, theirs = student.state_dict(), ckpt.load(run / "ema.pt")
    assert all(torch.equal(own[k], v) for k, v in theirs.items())
    assert all("cond_proj" in k for k in own.keys() - theirs.keys())

    gin_file = tmp_path / "stage1.gin"
    # stage 1 on the tiny DiT: the student is the folder's DiT with a w input, the teacher a run saved from the folder
    text = STAGE_1.format(folder=folder, dim=D)
    assert f"train.teacher = '{folder}'" in text
    gin_file.write_text(text.replace(f"train.teacher = '{folder}'", f"train.teacher = '{run}'"))
    done = launch(gin_file, tmp_path / "run")
    assert done.returncode == 0, done.stderr[-3000:]
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert (info["status"], info["method"], info["guided"], info["w_range"]) == ("complete", "GuidedDistillation", True, [0.0, 4.0])
    ema = ckpt.load(tmp_path / "run" / "ema.pt")
    assert ema.keys() == own.keys() and any(ema[k].any() for k in own.keys() - theirs.keys())  # w branches trained
    loaded = load_run(tmp_path / "run")
    assert loaded.denoiser.net.extra_conditions == ("w",)
    with torch.no_grad():
        out = loaded.denoiser(inputs().float(), DIT_SCHEDULE.grid(64)[[1, 20, 40, 64]],
                              Cond(torch.tensor([1, 2, 3, NULL_LABEL]), {"w": torch.full((4,), 2.0)}))
    assert torch.isfinite(out).all()
