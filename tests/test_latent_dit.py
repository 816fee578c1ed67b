"""A class-conditional DiT loaded from a diffusers folder, as users have one (``DiTPipeline.save_pretrained``:
model_index.json with id2label, transformer/, vae/, scheduler/ on the 'linear' β schedule), behind the denoiser
contract: the adapter is the DiT at the fractional timestep τ = schedule.timestep(λ), learned-σ channels dropped;
∅ (−1) is its null class row; its own label dropout is off; guidance on the doubled batch is two separate calls;
and what cannot work is refused in one line.  Tiny real components, nothing downloaded."""
import json
import shutil
from pathlib import Path

import pytest
import torch

from tests import tiny_diffusers as tiny
from tests.test_latent_engine import one_line
from tract_repro.diffusion.schedules import DiscreteSchedule, diffusers_schedule
from tract_repro.networks.conditioning import NULL_LABEL, Cond
from tract_repro.networks.denoiser import VPDenoiser, build_denoiser
from tract_repro.networks.diffusers_net import DiffusersNet, diffusers_network, folder_process, from_config, load_folder
from tract_repro.networks.guidance import GuidedDenoiser

CLASSES = 10
#: DiT's schedule (facebook/DiT-XL-2-*: β linear from 1e-4 to 0.02 over 1000 steps), not Stable Diffusion's
DIT_SCHEDULE = DiscreteSchedule(beta_schedule="linear", beta_start=0.0001, beta_end=0.02, num_train_timesteps=1000)
DIT_CONFIG = dict(num_attention_heads=2, attention_head_dim=4, in_channels=tiny.LATENT_CHANNELS,
                  out_channels=2 * tiny.LATENT_CHANNELS, num_layers=2, sample_size=tiny.LATENT_SIZE, patch_size=2,
                  num_embeds_ada_norm=CLASSES, norm_num_groups=1)


def dit_folder(path, scheduler="dpm", legacy=False, seed=0):
    """A tiny DiT folder as ``DiTPipeline(transformer, vae, scheduler, id2label).save_pretrained`` writes it, with
    model_index.json's id2label entry as facebook/DiT-XL-2-256 has it (a dict beside the component lists).

    ``scheduler``: 'dpm' (DPMSolverMultistepScheduler) or 'ddim' (DDIMScheduler), both on DiT's linear β.
    ``legacy``: name the transformer ``Transformer2DModel`` (class name and model_index entry), as the
    facebook/DiT-XL-2-256 folder does; diffusers maps it to DiTTransformer2DModel when loading."""
    from diffusers import DDIMScheduler, DiTPipeline, DiTTransformer2DModel, DPMSolverMultistepScheduler

    path = Path(path)
    torch.manual_seed(seed)
    transformer = DiTTransformer2DModel(**DIT_CONFIG).eval()
    betas = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                 prediction_type="epsilon")
    sched = DPMSolverMultistepScheduler(**betas) if scheduler == "dpm" else DDIMScheduler(clip_sample=False, **betas)
    id2label = {i: f"class {i}" for i in range(CLASSES)}
    DiTPipeline(transformer=transformer, vae=tiny.vae(), scheduler=sched, id2label=id2label).save_pretrained(
        path, safe_serialization=True)
    # diffusers 0.42 keeps id2label in the pipeline only; the hub's DiT folders carry it in model_index.json
    edit_json(path / "model_index.json", id2label={str(i): label for i, label in id2label.items()})
    if legacy:
        edit_json(path / "transformer" / "config.json", _class_name="Transformer2DModel")
        edit_json(path / "model_index.json", transformer=["diffusers", "Transformer2DModel"])
    return path


def edit_json(path, **changes):
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))




@pytest.fixture(scope="module", params=["dit-dpm", "legacy-ddim"])
def folder(request, tmp_path_factory):
    root = tmp_path_factory.mktemp("dit")
    if request.param == "dit-dpm":
        return dit_folder(root / "dit")
    return dit_folder(root / "dit", scheduler="ddim", legacy=True)


@pytest.fixture(scope="module")
def net(folder):
    return diffusers_network(folder=folder)


@pytest.fixture(scope="module")
def raw(folder):
    """The folder's DiT as diffusers loads it, once per folder (a test that sets train mode restores eval)."""
    return raw_dit(folder)


def raw_dit(folder):
    """The folder's DiT loaded by diffusers itself (its label dropout left as saved: 0.1)."""
    from diffusers import DiTTransformer2DModel

    return DiTTransformer2DModel.from_pretrained(folder, subfolder="transformer", use_safetensors=True).eval()


def inputs(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, tiny.LATENT_CHANNELS, tiny.LATENT_SIZE, tiny.LATENT_SIZE, dtype=torch.float64, generator=g)


def label_embeddings(model):
    from diffusers.models.embeddings import LabelEmbedding

    return [m for m in model.modules() if isinstance(m, LabelEmbedding)]


def test_the_folder_is_what_a_dit_pipeline_writes_and_loads_as_a_class_conditional_dit(folder, net, raw):
    from diffusers import DiTTransformer2DModel

    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "DiTPipeline" and index["id2label"]["3"] == "class 3"
    assert index["transformer"][1] in ("DiTTransformer2DModel", "Transformer2DModel")
    assert (folder / "transformer" / "diffusion_pytorch_model.safetensors").is_file()
    assert isinstance(net, DiffusersNet) and isinstance(net.model, DiTTransformer2DModel)
    assert (net.num_classes, net.conditional, net.text) == (CLASSES, True, False)
    assert (net.has_null, net.is_unet) == (True, False)
    assert (net.in_channels, net.resolution, net.folders) == (4, 8, {"model": folder, "text": None})
    assert not hasattr(net, "empty_text") and not net.model.training
    # the pretrained weights, not a fresh initialisation
    theirs, own = raw.state_dict(), net.model.state_dict()
    assert own.keys() == theirs.keys() and all(torch.equal(v, theirs[k]) for k, v in own.items())


def test_the_schedule_is_the_folders_linear_one(folder, net):
    """DiT's scheduler is β linear 1e-4 → 0.02: the adapter's schedule and diffusers_schedule both read it, ᾱ is
    the scheduler's own (float32 cumprod against our float64 log-sum), and a run on Stable Diffusion's default
    scaled_linear schedule is refused."""
    from diffusers import DDIMScheduler

    schedule = diffusers_schedule(folder)
    assert schedule == DIT_SCHEDULE and net.schedule == DIT_SCHEDULE
    scheduler = DDIMScheduler.from_pretrained(folder, subfolder="scheduler")
    torch.testing.assert_close(schedule.alphas_cumprod.float(), scheduler.alphas_cumprod, rtol=1e-5, atol=0)
    assert folder_process(folder) == dict(parameterisation="eps", noise_schedule="DiscreteSchedule")
    assert isinstance(build_denoiser(net, schedule, "eps"), VPDenoiser)
    one_line(lambda: build_denoiser(net, DiscreteSchedule(), "eps"), "linear", "scaled_linear",
             "train.schedule = @diffusers_schedule")


def test_the_adapter_is_the_dit_at_the_fractional_timestep_without_its_sigma_channels(net, raw):
    """F(x, λ, labels) = DiT(x, τ(λ), labels)[:, :4], bit for bit, at trained timesteps and between them; the
    denoiser is x̂ = (x_t − σ·ε̂)/α of it."""
    x = inputs()
    tau = torch.tensor([0.0, 41.0, 999.0, 517.25], dtype=torch.float64)
    logsnr = DIT_SCHEDULE.logsnr((tau + 1) / 1000)
    timestep = DIT_SCHEDULE.timestep(logsnr)
    torch.testing.assert_close(timestep, tau, rtol=0, atol=1e-9)  # float64 round trip λ → τ
    labels = torch.tensor([0, 3, 7, 9])
    with torch.no_grad():
        ours = net(x.float(), logsnr, labels)
        theirs = raw(x.float(), timestep=timestep.float(), class_labels=labels).sample
        assert theirs.shape == (4, 8, 8, 8) and ours.shape == (4, 4, 8, 8)
        assert torch.equal(ours, theirs[:, :4])
        assert not torch.allclose(ours, theirs[:, 4:])  # the σ channels are the other half
        # τ is fed fractional: the DiT at the rounded-down timestep differs
        floor = raw(x.float(), timestep=timestep.floor().float(), class_labels=labels).sample
        assert not torch.allclose(ours[3], floor[3, :4]) and torch.equal(ours[:3], floor[:3, :4])
        denoised = VPDenoiser(net, DIT_SCHEDULE, "eps")(x, logsnr, Cond(labels))
    alpha, sigma = (v.view(-1, 1, 1, 1) for v in DIT_SCHEDULE.alpha_sigma(logsnr))
    torch.testing.assert_close(denoised, (x - sigma * theirs[:, :4].double()) / alpha, rtol=0, atol=1e-12)


def test_the_null_label_is_the_dits_null_class_row(net, raw):
    # each block's AdaLayerNormZero embeds the label: CLASSES + 1 rows, row 10 is ∅
    assert [m.embedding_table.num_embeddings for m in label_embeddings(raw)] == [CLASSES + 1] * 2
    x = inputs(seed=1)
    logsnr = DIT_SCHEDULE.grid(8)[1:5]
    with torch.no_grad():
        ours = net(x.float(), logsnr, torch.tensor([NULL_LABEL, 2, NULL_LABEL, 5]))
        theirs = raw(x.float(), timestep=DIT_SCHEDULE.timestep(logsnr).float(),
                     class_labels=torch.tensor([CLASSES, 2, CLASSES, 5])).sample
        assert torch.equal(ours, theirs[:, :4])
        assert torch.equal(ours, net(x.float(), logsnr, torch.tensor([CLASSES, 2, CLASSES, 5])))
        assert not torch.allclose(ours[0], net(x[:1].float(), logsnr[:1], torch.tensor([2]))[0])  # ∅ is not a class


def test_the_dits_own_label_dropout_is_off(net, raw):
    """∅ is the method's (TeacherTraining.p_uncond): in train mode the adapter is deterministic and equal to eval,
    where the same DiT as diffusers loads it (dropout_prob 0.1) drops labels at random."""
    assert [m.dropout_prob for m in label_embeddings(net.model)] == [0.0] * 2  # one per block
    assert [m.dropout_prob for m in label_embeddings(raw)] == [0.1] * 2
    x = inputs(n=32, seed=2)
    logsnr = DIT_SCHEDULE.grid(32)[1:33]
    labels = torch.arange(32) % CLASSES
    with torch.no_grad():
        evaluated = net(x.float(), logsnr, labels)
        net.train()
        try:
            torch.manual_seed(1)
            assert all(torch.equal(net(x.float(), logsnr, labels), evaluated) for _ in range(3))
        finally:
            net.eval()
        raw.train()
        try:
            torch.manual_seed(1)  # with this seed diffusers' own dropout replaces some labels by ∅
            dropped = raw(x.float(), timestep=DIT_SCHEDULE.timestep(logsnr).float(), class_labels=labels).sample[:, :4]
        finally:
            raw.eval()
    assert not torch.equal(dropped, evaluated)


def test_the_guided_denoiser_on_the_dit_equals_two_separate_calls(net):
    D = VPDenoiser(net, DIT_SCHEDULE, "eps").eval()
    x = inputs(seed=3)
    logsnr = DIT_SCHEDULE.grid(16)[[2, 5, 9, 16]]
    labels = torch.tensor([1, 4, 0, 9])
    w = torch.tensor([0.0, 1.0, 2.5, 4.0], dtype=torch.float64)
    with torch.no_grad():
        guided = GuidedDenoiser(D)(x, logsnr, Cond(labels, {"w": w}))
        xc = D(x, logsnr, Cond(labels))
        xu = D(x, logsnr, Cond(torch.full_like(labels, NULL_LABEL)))
    w = w.view(-1, 1, 1, 1)
    # float32 DiT on a batch of 8 against two batches of 4: equal up to the kernels' summation order
    torch.testing.assert_close(guided, (1 + w) * xc - w * xu, rtol=0, atol=1e-5)
    assert not torch.allclose(xc, xu)


# --- one-line refusals -------------------------------------------------------------------------------------------

def test_a_dit_without_a_null_class_is_refused_for_the_null_label_only(folder, net):
    """A DiT built without label dropout has num_classes rows: it computes its classes but not x̂(x_t, ∅)."""
    from torch import nn

    model = raw_dit(folder)
    for embedding in label_embeddings(model):  # as LabelEmbedding(CLASSES, width, dropout_prob=0) builds it
        table = nn.Embedding(CLASSES, embedding.embedding_table.embedding_dim)
        table.weight.data.copy_(embedding.embedding_table.weight.data[:CLASSES])
        embedding.embedding_table, embedding.dropout_prob = table, 0.0
    plain = DiffusersNet(model, DIT_SCHEDULE)
    assert (plain.has_null, plain.num_classes, plain.conditional) == (False, CLASSES, True)
    x = inputs(seed=4)
    logsnr = DIT_SCHEDULE.grid(8)[1:5]
    labels = torch.tensor([0, 3, 7, 9])
    with torch.no_grad():
        assert torch.equal(plain(x.float(), logsnr, labels), net(x.float(), logsnr, labels))
    one_line(lambda: plain(x.float(), logsnr, torch.tensor([0, NULL_LABEL, 7, 9])), "no null class", "∅")


def test_labels_and_text_are_refused_where_they_do_not_fit(net):
    x = inputs()
    logsnr = DIT_SCHEDULE.grid(8)[1:5]
    one_line(lambda: net(x.float(), logsnr), "class-conditional (10 classes)", "labels are required")
    one_line(lambda: net(x.float(), logsnr, torch.zeros(4, dtype=torch.long), {"text": torch.zeros(4, 77, 16)}),
             "takes class labels", "'text'")


def test_a_transformer_without_ada_norm_zero_is_refused(tmp_path):
    """A Transformer2DModel that is not a DiT (continuous input, layer_norm), from a config or from a folder."""
    from diffusers import Transformer2DModel

    config = dict(num_attention_heads=2, attention_head_dim=4, in_channels=tiny.LATENT_CHANNELS, num_layers=1,
                  sample_size=tiny.LATENT_SIZE, norm_num_groups=1, norm_type="layer_norm")
    one_line(lambda: from_config({"_class_name": "Transformer2DModel", **config}, None, DIT_SCHEDULE),
             "Transformer2DModel", "ada_norm_zero", "'layer_norm'")
    folder = tmp_path / "not-dit"
    torch.manual_seed(0)
    Transformer2DModel(**config).save_pretrained(folder / "transformer", safe_serialization=True)
    tiny.scheduler(beta_schedule="linear").save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "DiTPipeline", "transformer": ["diffusers", "Transformer2DModel"],
        "scheduler": ["diffusers", "DDIMScheduler"]}))
    one_line(lambda: load_folder(folder), "Transformer2DModel", "ada_norm_zero", "'layer_norm'")


def test_a_dit_folder_with_another_vae_is_refused_before_loading(folder, tmp_path):
    copy = Path(shutil.copytree(folder, tmp_path / "dit"))
    edit_json(copy / "vae" / "config.json", latent_channels=8)
    one_line(lambda: load_folder(copy), "latent_channels = 8", "transformer takes in_channels = 4")


def test_a_transformer_config_without_norm_type_is_refused_in_one_line():
    from tract_repro.common.errors import ConfigError
    from tract_repro.diffusion.schedules import DiscreteSchedule
    from tract_repro.networks.diffusers_net import from_config

    with pytest.raises(ConfigError, match="needs norm_type 'ada_norm_zero' and num_embeds_ada_norm"):
        from_config({"_class_name": "Transformer2DModel", "sample_size": 8, "in_channels": 4}, None,
                    DiscreteSchedule())
