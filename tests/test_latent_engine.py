"""diffusers teachers behind the denoiser contract, on the tiny real components of tests/tiny_diffusers.py: the
adapter is the diffusers network at the matching timestep, ∅ is the empty prompt (or the null class), guidance and
the BTD and TRACT targets work through it unchanged, a v fine-tune trains through the launcher and is rebuilt
exactly, and what cannot work is refused in one line."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests import tiny_diffusers as tiny
from tests.test_methods import phase_of
from tests.tiny_latents import CPU_RUN
from tract_repro.common.errors import ConfigError
from tract_repro.diffusion.ddim import ddim_step
from tract_repro.diffusion.grid import TimeGrid
from tract_repro.diffusion.schedules import CosineSchedule, DiscreteSchedule
from tract_repro.methods import BTD, TRACT, TeacherTraining
from tract_repro.methods.base import Networks
from tract_repro.methods.btd import btd_indices
from tract_repro.methods.tract import tract_indices
from tract_repro.networks.conditioning import NULL_LABEL, Cond
from tract_repro.networks.denoiser import VPDenoiser, build_denoiser
from tract_repro.networks.diffusers_net import check_sdpa, diffusers_network, from_config, load_folder
from tract_repro.networks.guidance import GuidedDenoiser
from tract_repro.training import teacher as teachers

ROOT = Path(__file__).resolve().parents[1]
TEXT = (tiny.MAX_TOKENS, tiny.TEXT_WIDTH)
SCHEDULE = DiscreteSchedule()  # the tiny folders' scheduler: Stable Diffusion's scaled_linear


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("diffusers")
    return dict(text=tiny.stable_diffusion_folder(root / "sd"), classes=tiny.class_conditional_folder(root / "classes"))


@pytest.fixture(scope="module")
def nets(folders):
    """The folders' networks, loaded once (tests that change a network load their own)."""
    return dict(text=load_folder(folders["text"]), classes=load_folder(folders["classes"]),
                perturbed=tiny_perturbed(folders["text"]))


def inputs(n=4, seed=0, text=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, tiny.LATENT_CHANNELS, tiny.LATENT_SIZE, tiny.LATENT_SIZE, dtype=torch.float64, generator=g)
    extra = {"text": torch.randn(n, *TEXT, generator=g)} if text else {}
    return x, extra


def raw_model(folder):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(folder, subfolder="unet", use_safetensors=True).eval()


@pytest.mark.parametrize("kind", ["text", "classes"])
def test_the_adapter_is_the_diffusers_unet_at_the_matching_timestep(folders, nets, kind):
    """At a trained timestep n (λ_n of the grid) and between two (a fractional τ), F(x, λ) is the UNet at τ, and the
    ε-parameterised denoiser is x̂ = (x_t − σ·ε̂)/α of it."""
    net, raw = nets[kind], raw_model(folders[kind])
    x, extra = inputs(text=kind == "text")
    tau = torch.tensor([0.0, 41.0, 999.0, 517.25], dtype=torch.float64)
    logsnr = SCHEDULE.logsnr((tau + 1) / 1000)
    labels = torch.tensor([0, 3, 7, 9]) if kind == "classes" else torch.zeros(4, dtype=torch.long)
    with torch.no_grad():
        ours = net(x.float(), logsnr, labels, extra)
        context = extra["text"] if kind == "text" else torch.zeros(4, 1, tiny.TEXT_WIDTH)
        theirs = raw(x.float(), tau.float(), encoder_hidden_states=context,
                     class_labels=labels if kind == "classes" else None).sample
        assert torch.equal(SCHEDULE.timestep(logsnr), tau)
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
        denoised = VPDenoiser(net, SCHEDULE, "eps")(x, logsnr, Cond(labels, extra))
    alpha, sigma = (v.view(-1, 1, 1, 1) for v in SCHEDULE.alpha_sigma(logsnr))
    torch.testing.assert_close(denoised, (x - sigma * theirs.double()) / alpha, rtol=0, atol=1e-12)


def test_the_null_label_is_the_empty_prompt_or_the_null_class(folders, nets):
    from transformers import CLIPTextModel, CLIPTokenizer

    text_net, class_net = nets["text"], nets["classes"]
    tokenizer = CLIPTokenizer.from_pretrained(folders["text"] / "tokenizer")
    encoder = CLIPTextModel.from_pretrained(folders["text"] / "text_encoder")
    ids = tokenizer([""], padding="max_length", max_length=tiny.MAX_TOKENS, return_tensors="pt").input_ids
    with torch.no_grad():
        empty = encoder(ids).last_hidden_state
    assert torch.equal(text_net.empty_text, empty) and "empty_text" in text_net.state_dict()
    x, extra = inputs()
    logsnr = SCHEDULE.grid(8)[1:5]
    null, real = torch.tensor([NULL_LABEL, 0, NULL_LABEL, 0]), torch.zeros(4, dtype=torch.long)
    with torch.no_grad():
        mixed = text_net(x.float(), logsnr, null, extra)
        by_hand = text_net(x.float(), logsnr, real, {"text": torch.where((null < 0).view(-1, 1, 1), empty, extra["text"])})
        torch.testing.assert_close(mixed, by_hand, rtol=0, atol=0)
        torch.testing.assert_close(text_net(x.float(), logsnr), text_net(x.float(), logsnr, real, {"text": empty.expand(4, -1, -1)}),
                                   rtol=0, atol=0)  # no labels, no captions: the empty prompt
        classes = torch.tensor([NULL_LABEL, 2, NULL_LABEL, 5])
        torch.testing.assert_close(class_net(x.float(), logsnr, classes),
                                   class_net(x.float(), logsnr, torch.tensor([10, 2, 10, 5])), rtol=0, atol=0)
    with pytest.raises(ConfigError, match="caption embeddings"):
        text_net(x.float(), logsnr, real)


@pytest.mark.parametrize("kind", ["text", "classes"])
def test_the_guided_denoiser_on_the_adapter_equals_two_separate_calls(nets, kind):
    D = VPDenoiser(nets[kind], SCHEDULE, "eps").eval()
    x, extra = inputs(text=kind == "text")
    logsnr = SCHEDULE.grid(16)[[2, 5, 9, 16]]
    labels = torch.tensor([1, 4, 0, 9]) if kind == "classes" else torch.zeros(4, dtype=torch.long)
    w = torch.tensor([0.0, 1.0, 2.5, 4.0], dtype=torch.float64)
    with torch.no_grad():
        guided = GuidedDenoiser(D)(x, logsnr, Cond(labels, {**extra, "w": w}))
        xc = D(x, logsnr, Cond(labels, extra))
        xu = D(x, logsnr, Cond(torch.full_like(labels, NULL_LABEL), extra))
    w = w.view(-1, 1, 1, 1)
    torch.testing.assert_close(guided, (1 + w) * xc - w * xu, rtol=0, atol=1e-5)
    assert not torch.allclose(xc, xu)


def test_a_dit_keeps_its_first_channels_and_its_null_class_and_never_drops_labels_itself():
    from diffusers import DiTTransformer2DModel

    config = dict(_class_name="DiTTransformer2DModel", num_attention_heads=2, attention_head_dim=4, in_channels=4,
                  out_channels=8, num_layers=1, sample_size=8, patch_size=2, num_embeds_ada_norm=10, norm_num_groups=1)
    torch.manual_seed(0)
    net = diffusers_network(config=config)
    raw = DiTTransformer2DModel.from_config({k: v for k, v in config.items() if k != "_class_name"})
    raw.load_state_dict(net.model.state_dict())
    x, _ = inputs(text=False)
    logsnr = SCHEDULE.grid(4)[1:]
    labels = torch.tensor([0, 9, NULL_LABEL, 3])
    assert (net.num_classes, net.in_channels, net.resolution, net.conditional) == (10, 4, 8, True)
    with torch.no_grad():
        ours = net(x.float(), logsnr, labels)
        theirs = raw.eval()(x.float(), timestep=SCHEDULE.timestep(logsnr).float(), class_labels=torch.tensor([0, 9, 10, 3])).sample
        torch.testing.assert_close(ours, theirs[:, :4], rtol=0, atol=0)
        net.train()  # diffusers' own label dropout is off: ∅ is the method's (TeacherTraining.p_uncond)
        torch.manual_seed(1)
        assert all(torch.equal(net(x.float(), logsnr, labels), ours) for _ in range(5))


def test_bf16_autocast_runs_the_adapter(nets):
    """The loop's Device autocast (bf16) around a call: τ stays float64-exact, the network runs in bf16."""
    from tract_repro.training.device import Device

    D = VPDenoiser(nets["text"], SCHEDULE, "eps").eval()
    x, extra = inputs()
    logsnr = SCHEDULE.grid(8)[1:5]
    with torch.no_grad():
        full = D(x, logsnr, Cond(torch.zeros(4, dtype=torch.long), extra))
        with Device("cpu", autocast="bf16").autocast():
            half = D(x, logsnr, Cond(torch.zeros(4, dtype=torch.long), extra))
    assert half.dtype == torch.float64 and torch.isfinite(half).all()
    assert (half - full).abs().max() < 0.05 * full.abs().max()


def test_gradient_checkpointing_is_diffusers_own_and_attention_is_sdpa(folders):
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    net = load_folder(folders["text"], gradient_checkpointing=True)
    assert net.model.is_gradient_checkpointing
    assert net.model.attn_processors and all(isinstance(p, AttnProcessor2_0) for p in net.model.attn_processors.values())
    x, extra = inputs()
    out = net.train()(x.float(), SCHEDULE.grid(8)[1:5], torch.zeros(4, dtype=torch.long), extra)
    out.square().mean().backward()
    assert all(p.grad is not None for p in net.model.parameters() if p.requires_grad)
    net.model.set_attn_processor(AttnProcessor())  # the pre-SDPA processor
    one_line(lambda: check_sdpa(net.model), "AttnProcessor", "scaled_dot_product_attention")


def btd_reference(target, D, t, t_mid, s, grid, cond):
    """Two unclipped teacher DDIM steps t → t_mid → s, sample by sample, compared with one step along the target."""
    for b in range(t.shape[0]):
        i = slice(b, b + 1)
        lt, a_t, s_t = grid.at(t[i]); lm, a_m, s_m = grid.at(t_mid[i]); _, a_s, s_s = grid.at(s[i])
        x_mid = ddim_step(target.x_t[i], D(target.x_t[i], lt, cond[i]), a_t, s_t, a_m, s_m)
        x_s = ddim_step(x_mid, D(x_mid, lm, cond[i]), a_m, s_m, a_s, s_s)
        landed = ddim_step(target.x_t[i], target.x_target[i], a_t, s_t, a_s, s_s)
        torch.testing.assert_close(landed, x_s, rtol=0, atol=1e-4)  # float32 networks, batch of 1 or 6


def tract_reference(target, teacher, self_teacher, t, t1, ti, grid, cond):
    """Teacher step t → t₁, then (where the group is not finished) self-teacher step t₁ → t_i, unclipped."""
    for b in range(t.shape[0]):
        i = slice(b, b + 1)
        lt, a_t, s_t = grid.at(t[i]); l1, a1, s1 = grid.at(t1[i]); _, ai, si = grid.at(ti[i])
        x = ddim_step(target.x_t[i], teacher(target.x_t[i], lt, cond[i]), a_t, s_t, a1, s1)
        if t1[b] != ti[b]:
            x = ddim_step(x, self_teacher(x, l1, cond[i]), a1, s1, ai, si)
        landed = ddim_step(target.x_t[i], target.x_target[i], a_t, s_t, ai, si)
        torch.testing.assert_close(landed, x, rtol=0, atol=1e-4)


@pytest.mark.parametrize("method", ["btd", "tract"])
def test_btd_and_tract_targets_on_the_tiny_latent_model(nets, method):
    """The methods, unchanged, distil the text-to-image teacher (captions, some rows ∅) on its own 64-step grid."""
    grid = TimeGrid(SCHEDULE, 64)
    teacher = VPDenoiser(nets["text"], SCHEDULE, "eps").eval()
    self_teacher = VPDenoiser(nets["perturbed"], SCHEDULE, "eps").eval()
    x, extra = inputs(n=6, seed=3)
    cond = Cond(torch.tensor([0, NULL_LABEL, 0, 0, NULL_LABEL, 0]), extra)
    S = (64, 8, 1) if method == "tract" else (64, 32, 16, 8, 4, 2, 1)
    rule = TRACT(schedule=S, clip=False) if method == "tract" else BTD(start_steps=64, final_steps=1)
    for p in (0, len(S) - 2):
        gen = torch.Generator().manual_seed(p)
        state = gen.get_state()
        with torch.no_grad():
            target = rule(x, cond, phase_of(S, p), Networks(teacher, self_teacher), grid, gen)
            gen.set_state(state)
            if method == "tract":
                tract_reference(target, teacher, self_teacher, *tract_indices(S, p, 64, 6, gen), grid, cond)
            else:
                t, t_mid, s = btd_indices(S, p, 64, 6, gen)
                btd_reference(target, teacher, t, t_mid, s, grid, cond)
        assert target.cond is cond


def tiny_perturbed(folder):
    """The folder's network with its weights moved a little (a self-teacher that differs from the teacher)."""
    net = load_folder(folder)
    with torch.no_grad():
        for p in net.model.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    return net


def test_a_diffusers_folder_is_a_teacher(folders, nets):
    """train.teacher = a diffusers folder: its UNet weights (and ∅) load into the student; its prediction type is
    the teacher's parameterisation."""
    student = VPDenoiser(tiny_perturbed(folders["text"]), SCHEDULE, "eps")
    weights = teachers.load_into(student, folders["text"], expect=dict(parameterisation="eps",
                                                                        noise_schedule="DiscreteSchedule"))
    assert weights == folders["text"] / "unet" / "diffusion_pytorch_model.safetensors"
    reference = nets["text"].state_dict()
    assert all(torch.equal(v, reference[k[len("net."):]]) for k, v in student.state_dict().items())
    with pytest.raises(teachers.TeacherError, match="parameterisation = 'eps' but this run uses 'v'"):
        teachers.load_into(student, folders["text"], expect=dict(parameterisation="v"))


def test_the_loop_takes_a_cond_from_the_data_and_conditions_its_grids_on_grid_cond(folders, tmp_path):
    """A data set's batch may return a whole Cond (here captions, with label dropout to ∅), and the sample grids
    ask the data set for their conditioning."""
    from tests.tiny_latents import tiny_latents
    from tract_repro.diffusion.schedules import diffusers_schedule
    from tract_repro.training.device import Device
    from tract_repro.training.loop import train
    from tract_repro.training.optim import InferenceEMA

    data = tiny_latents(n=8, text_shape=TEXT)
    train(tmp_path / "run", method=TeacherTraining(sample_steps=4, p_uncond=0.5), dataset=lambda: data,
          network=lambda: diffusers_network(folder=folders["text"]), schedule=lambda: diffusers_schedule(folders["text"]),
          T=64, parameterisation="v", batch_size=4, total=8, log_every=4, checkpoint_every=8, grid_size=3,
          grid_max_steps=4, tensorboard=False, device=Device("cpu"), inference_ema=InferenceEMA(momentum=0.5))
    assert data.grid_calls == [3] and (tmp_path / "run" / "samples" / "final_4steps.png").is_file()


V_FINE_TUNE = """
import tests.tiny_latents
train.dataset = @tiny_latents
tiny_latents.n = 16
tiny_latents.text_shape = {text}
train.network = @diffusers_network
diffusers_network.folder = '{folder}'
train.schedule = @diffusers_schedule
diffusers_schedule.folder = '{folder}'
train.T = 64
train.parameterisation = 'v'
train.method = @TeacherTraining()
TeacherTraining.sample_steps = 4
TeacherTraining.p_uncond = 0.25
train.batch_size = 4
train.total = 12
train.checkpoint_every = 8
""" + CPU_RUN


def launch(gin_file, workdir):
    return subprocess.run([sys.executable, "-m", "tract_repro.launch", str(gin_file), "--workdir", str(workdir)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_a_v_fine_tune_of_stable_diffusion_trains_through_launch_and_is_rebuilt_exactly(folders, nets, tmp_path):
    """Meng et al.'s v fine-tune: teacher training from the folder's ε weights with v prediction; the finished run,
    rebuilt from its config.gin and ema.pt, is the network those weights make."""
    from tract_repro.evaluation.runs import image_shape, load_run
    from tract_repro.training import checkpoint as ckpt

    gin_file = tmp_path / "v.gin"
    gin_file.write_text(V_FINE_TUNE.format(folder=folders["text"], text=TEXT))
    done = launch(gin_file, tmp_path / "run")
    assert done.returncode == 0, done.stderr[-3000:]
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert (info["status"], info["parameterisation"], info["noise_schedule"]) == ("complete", "v", "DiscreteSchedule")
    ema = ckpt.load(tmp_path / "run" / "ema.pt")
    pretrained = nets["text"].state_dict()
    assert torch.equal(ema["net.empty_text"], pretrained["empty_text"])
    assert any(not torch.equal(ema[f"net.{k}"], v) for k, v in pretrained.items())  # the weights were fine-tuned

    run = load_run(tmp_path / "run")
    by_hand = VPDenoiser(load_folder(folders["text"]), SCHEDULE, "v")
    by_hand.load_state_dict(ema)
    x, extra = inputs()
    logsnr = SCHEDULE.grid(64)[[1, 20, 40, 64]]
    cond = Cond(torch.tensor([0, NULL_LABEL, 0, 0]), extra)
    with torch.no_grad():
        assert torch.equal(run.denoiser(x, logsnr, cond), by_hand.eval()(x, logsnr, cond))
    assert type(run.grid.schedule) is DiscreteSchedule and torch.equal(run.grid.logsnr, SCHEDULE.grid(64))
    assert image_shape(run.denoiser) == run.data.shape == (tiny.LATENT_CHANNELS, tiny.LATENT_SIZE, tiny.LATENT_SIZE)


# --- one-line refusals -------------------------------------------------------------------------------------------

def one_line(call, *words):
    with pytest.raises(ConfigError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message, message
    for word in words:
        assert word in message, message
    return message


def copy_folder(folders, kind, tmp_path):
    return Path(shutil.copytree(folders[kind], tmp_path / kind))


def edit_json(path, **changes):
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_pickled_weights_load_only_through_the_safe_loader(folders, tmp_path):
    folder = copy_folder(folders, "classes", tmp_path)
    unet = folder / "unet"
    state = load_folder(folder).model.state_dict()
    (unet / "diffusion_pytorch_model.safetensors").rename(unet / "diffusion_pytorch_model.fp16.safetensors")
    one_line(lambda: load_folder(folder), "holds diffusion_pytorch_model.fp16.safetensors", "fetch the float32 weights")
    (unet / "diffusion_pytorch_model.fp16.safetensors").unlink()
    torch.save(state, unet / "diffusion_pytorch_model.bin")  # a plain state dict: weights_only accepts it
    assert all(torch.equal(v, state[k]) for k, v in load_folder(folder).model.state_dict().items())
    torch.save({"weights": state, "code": Path("anything")}, unet / "diffusion_pytorch_model.bin")
    one_line(lambda: load_folder(folder), "weights_only=True", "refuses", "diffusion_pytorch_model.safetensors")


def test_components_that_do_not_fit_are_refused(folders, tmp_path):
    folder = copy_folder(folders, "text", tmp_path)
    edit_json(folder / "vae" / "config.json", latent_channels=8)
    one_line(lambda: load_folder(folder), "latent_channels = 8", "in_channels = 4")
    edit_json(folder / "vae" / "config.json", latent_channels=4)
    edit_json(folder / "text_encoder" / "config.json", hidden_size=32)
    one_line(lambda: load_folder(folder), "hidden_size = 32", "cross_attention_dim = 16")
    shutil.rmtree(folder / "text_encoder")
    one_line(lambda: load_folder(folder), "empty prompt", "text_encoder/")
    config = dict(tiny.unet().config)
    one_line(lambda: from_config(config, None, DiscreteSchedule()), "empty prompt", "empty_text_from")
    assert from_config(config, folders["text"], DiscreteSchedule()).empty_text.shape == (1, *TEXT)


def test_a_network_on_another_schedule_than_the_run_is_refused(folders):
    net = load_folder(folders["classes"])
    one_line(lambda: build_denoiser(net, CosineSchedule(), "eps"), "train.schedule = @diffusers_schedule")
    one_line(lambda: build_denoiser(net, DiscreteSchedule(beta_schedule="linear", beta_start=0.0001, beta_end=0.02),
                                    "eps"), "scaled_linear", "linear")
    assert isinstance(build_denoiser(net, DiscreteSchedule(), "v"), VPDenoiser)
def test_a_folder_without_model_index_is_refused(tmp_path):
    (tmp_path / "sd").mkdir()
    (tmp_path / "sd" / "v1-5-pruned.ckpt").write_bytes(b"not read")
    one_line(lambda: load_folder(tmp_path / "sd"), "no model_index.json", "v1-5-pruned.ckpt", "fetch",
             f"into {tmp_path / 'sd'}")
    one_line(lambda: teachers.resolve(tmp_path / "sd"), "no ema.pt")  # nor a run: the teacher's own line


def test_a_folder_without_model_index_is_refused_through_launch_and_nothing_is_written(folders, tmp_path):
    (tmp_path / "sd").mkdir()
    gin_file = tmp_path / "v.gin"
    gin_file.write_text(V_FINE_TUNE.format(folder=tmp_path / "sd", text=TEXT).replace(
        f"diffusers_schedule.folder = '{tmp_path / 'sd'}'", f"diffusers_schedule.folder = '{folders['text']}'"))
    done = launch(gin_file, tmp_path / "run")
    assert done.returncode == 2 and "no model_index.json" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


def test_a_clipping_method_on_latents_is_refused_through_launch_and_nothing_is_written(folders, tmp_path):
    """TRACT clips its teacher's x̂ to [−1, 1] by default (the official code's rule for pixels); latents are not
    bounded there, so TRACT on a latent data set with clip on is one line naming TRACT.clip = False."""
    text = V_FINE_TUNE.format(folder=folders["text"], text=TEXT).replace(
        "train.method = @TeacherTraining()\nTeacherTraining.sample_steps = 4\nTeacherTraining.p_uncond = 0.25\n",
        f"train.method = @TRACT()\nTRACT.schedule = (64, 8, 1)\ntrain.teacher = '{folders['text']}'\n"
    ).replace("train.parameterisation = 'v'", "train.parameterisation = 'eps'")  # the tiny folder's ε teacher
    gin_file = tmp_path / "tract.gin"
    gin_file.write_text(text)
    done = launch(gin_file, tmp_path / "run")
    assert done.returncode == 2 and "set TRACT.clip = False" in done.stderr, done.stderr[-2000:]
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())
    gin_file.write_text(text + "TRACT.clip = False\ntrain.total = 8\n")
    done = launch(gin_file, tmp_path / "run")
    assert done.returncode == 0, done.stderr[-3000:]
