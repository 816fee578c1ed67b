"""The latent digits' space: the upsampled digits as an image source and pixel data set, the small AutoencoderKL
trained on them (python -m tract_repro.train_vae: exact resume, a diffusers folder with its measured scaling factor,
one-line refusals), decoding in evaluation and grids, and the VAE's reconstruction floor.

Everything runs on 16×16 digits (digits:16) and a 2-level VAE of 8 channels (16×16 → 8×8×4) for a few steps."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import bitwise_equal, tiny_gin
from tract_repro.common.errors import ConfigError
from tract_repro.data.arrays import ImageArrays
from tract_repro.data.autoencoder import posterior_means, train_vae, vae_architecture
from tract_repro.data.digits import digits, digits_arrays, digits_upsampled, upsample
from tract_repro.data.latent_encoding import encode
from tract_repro.data.latent_sources import DigitsSource, open_source
from tract_repro.data.latents import LatentArrays
from tract_repro.evaluation.classifier import DigitsClassifier, at_classifier_resolution, split, train_classifier
from tract_repro.evaluation import frechet
from tract_repro.evaluation.metrics import reconstruction_floor

R = 16  # the tests' digits side: 2 × 8


def tiny_architecture():
    return vae_architecture(block_out_channels=(8, 8), latent_channels=4, norm_num_groups=4)


TINY = dict(data=lambda: digits_upsampled(R), architecture=tiny_architecture, steps=6, batch_size=8,
            checkpoint_every=2, log_every=1, progress=False)


class Stop(Exception):
    """Raised from on_step: an interruption at a step boundary."""


def stop_after(n):
    def on_step(step):
        if step == n:
            raise Stop(step)
    return on_step


@pytest.fixture(scope="module")
def vae_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("vae") / "run"
    train_vae(out, **TINY)
    return out


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    folder = tmp_path_factory.mktemp("classifier")
    train_classifier(folder, epochs=3, min_accuracy=0.5)
    return folder


@pytest.fixture(scope="module")
def encoded(vae_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("latents") / "digits16"
    encode(vae_run, f"digits:{R}", out, batch=64, shard_size=512, progress=False)
    return out


# ----------------------------------------------------------------------------------- the 32×32 (R×R) digits


def test_the_upsampled_digits_are_each_digit_pixel_repeated_over_a_block():
    raw, labels = digits_arrays()
    data = digits_upsampled(32)
    assert data.shape == (1, 32, 32) and len(data) == 1797 and data.num_classes == 10 and data.name == "digits-32"
    expected = np.empty((1797, 1, 32, 32))
    for i in range(32):
        for j in range(32):
            expected[:, 0, i, j] = raw[:, i // 4, j // 4] / 8.0 - 1.0  # [0, 16] → [−1, 1], nearest neighbour
    assert np.array_equal(data.images.numpy(), expected.astype(np.float32))
    assert data.images.min() == -1 and data.images.max() == 1
    assert torch.equal(data.labels, torch.from_numpy(labels))
    # the area average the classifier's view takes undoes the upsampling exactly
    assert torch.equal(at_classifier_resolution(data.images), digits().images)
    assert torch.equal(upsample(digits().images, 8), digits().images)
    # a pixel data set decodes to itself
    x = data.batch(torch.arange(5))[0]
    assert data.decode(x) is x and data.pixels() is data and not data.encoded


def test_digits_are_an_image_source_without_files():
    source = open_source("digits:32")
    assert isinstance(source, DigitsSource) and len(source) == 1797 and source.channels == 1
    assert source.has_labels and source.max_label == 9 and source.resolution == 32
    data = digits_upsampled(32)
    items = list(source.items(1790))
    assert [item.label for item in items] == data.labels[1790:].tolist()
    for k, item in enumerate(items):
        assert np.array_equal(source.pixels(item, 32), data.images[1790 + k].numpy())
    assert source.identity() == open_source("digits:32").identity() and source.identity()["interpolation"] == "nearest"
    for bad in ("digits:12", "digits:x", "digits:4"):
        with pytest.raises(ConfigError, match="multiple of 8") as info:
            open_source(bad)
        assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="is 32×32"):
        source.pixels(items[0], 16)


# ----------------------------------------------------------------------------------- the autoencoder


def test_an_interrupted_vae_run_resumes_to_the_same_bits(vae_run, tmp_path):
    out = tmp_path / "interrupted"
    with pytest.raises(Stop):
        train_vae(out, on_step=stop_after(3), **TINY)  # after step 3: the newest checkpoint is step 2's
    assert [p.name for p in (out / "checkpoints").glob("*.pt")] == ["ckpt_00000002.pt"]
    assert not (out / "vae").exists() and not (out / "training.json").exists()
    record, _ = train_vae(out, **TINY)
    assert (out / "vae" / "diffusion_pytorch_model.safetensors").read_bytes() == \
        (vae_run / "vae" / "diffusion_pytorch_model.safetensors").read_bytes()
    assert (out / "vae" / "config.json").read_text() == (vae_run / "vae" / "config.json").read_text()
    uninterrupted = json.loads((vae_run / "training.json").read_text())
    assert record["losses"] == uninterrupted["losses"] and len(record["losses"]) == 6
    a = torch.load(out / "checkpoints" / "ckpt_00000006.pt", weights_only=True)
    b = torch.load(vae_run / "checkpoints" / "ckpt_00000006.pt", weights_only=True)
    a.pop("seconds"), b.pop("seconds")
    assert bitwise_equal(a, b)  # model, Adam, generator and RNG states, step, losses
    # a finished run is not trained again
    assert train_vae(out, **{**TINY, "on_step": stop_after(1)})[0] == record


def test_the_folder_is_a_diffusers_autoencoder_with_its_measured_scaling_factor(vae_run):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(vae_run, subfolder="vae", use_safetensors=True).eval()
    assert (vae_run / "vae" / "diffusion_pytorch_model.safetensors").is_file()
    assert json.loads((vae_run / "model_index.json").read_text())["vae"] == ["diffusers", "AutoencoderKL"]
    assert vae.config.in_channels == 1 and vae.config.sample_size == R and vae.config.latent_channels == 4
    images = digits_upsampled(R).images
    with torch.no_grad():
        mu = torch.cat([vae.encode(images[i:i + 256]).latent_dist.mean for i in range(0, len(images), 256)])
    assert mu.shape == (1797, 4, 8, 8)
    assert vae.config.scaling_factor == pytest.approx(1 / mu.flatten().std().item(), rel=1e-6)
    record = json.loads((vae_run / "training.json").read_text())
    assert record["latent_shape"] == [4, 8, 8] and record["scaling_factor"] == vae.config.scaling_factor


def test_a_bad_out_is_refused_in_one_line_and_nothing_is_overwritten(vae_run, classifier, tmp_path, capsys):
    from tract_repro.train_vae import main

    before = {p: p.read_bytes() for p in vae_run.rglob("*") if p.is_file()}
    with pytest.raises(ConfigError, match="holds a different VAE run") as info:  # another number of steps
        train_vae(vae_run, **{**TINY, "steps": 8})
    assert "steps: 6 there, 8 now" in str(info.value).splitlines()[0]  # the line the command prints
    with pytest.raises(ConfigError, match="holds a different VAE run"):  # another architecture
        train_vae(vae_run, **{**TINY, "architecture": lambda: vae_architecture((8, 8), latent_channels=2,
                                                                               norm_num_groups=4)})
    assert {p: p.read_bytes() for p in vae_run.rglob("*") if p.is_file()} == before
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    (tmp_path / "file").write_text("mine")
    cases = [(str(vae_run), "holds a different VAE run"), (str(tmp_path / "other"), "not a VAE run"),
             (str(tmp_path / "file"), "is a file")]
    for out, words in cases:
        assert main(["--out", out, "--classifier", str(classifier)]) == 2  # the default 32×32 run
        err = capsys.readouterr().err.strip()
        assert words in err and "\n" not in err
    assert {p: p.read_bytes() for p in vae_run.rglob("*") if p.is_file()} == before
    assert [p.name for p in (tmp_path / "other").iterdir()] == ["notes.txt"]
    assert (tmp_path / "file").read_text() == "mine"
    # a missing classifier stops the command before anything is trained or written
    assert main(["--out", str(tmp_path / "new"), "--classifier", str(tmp_path / "none")]) == 2
    assert "digits classifier" in capsys.readouterr().err and not (tmp_path / "new").exists()


def test_the_command_writes_the_folder_and_its_reconstruction_floor(vae_run, classifier, tmp_path, capsys):
    from tract_repro.data.autoencoder import reconstruct
    from tract_repro.evaluation.classifier import load_classifier
    from tract_repro.train_vae import main

    out = tmp_path / "vae"
    shutil.copytree(vae_run, out)  # a finished run: the command adds only its reconstruction floor
    gin = [f"digits_upsampled.resolution = {R}", "vae_architecture.block_out_channels = (8, 8)",
           "vae_architecture.norm_num_groups = 4", "train_vae.steps = 6", "train_vae.batch_size = 8",
           "train_vae.log_every = 1"]
    assert main(["--out", str(out), "--classifier", str(classifier), *sum((["--gin", g] for g in gin), [])]) == 0
    assert "reconstruction floor (digits-FD)" in capsys.readouterr().out
    result = json.loads((out / "reconstruction.json").read_text())
    images = digits_upsampled(R).images
    direct = reconstruction_floor(load_classifier(classifier), images, reconstruct(out, images))
    assert result["digits_fd_reconstruction_floor"] == direct["digits_fd_reconstruction_floor"]
    assert result["halves"] == [899, 898] and result["classifier_sha256"] and result["reconstruction_rmse"] > 0


# ----------------------------------------------------------------------------------- decoding


def test_decode_of_encode_matches_a_direct_vae_call(vae_run, encoded):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(vae_run, subfolder="vae", use_safetensors=True).eval()
    scaling = vae.config.scaling_factor
    data = LatentArrays(encoded)
    assert data.encoded and data.shape == (4, 8, 8) and len(data) == 1797 and data.num_classes == 10
    assert data.manifest["conditioning"] == "class" and "nearest" in data.manifest["preprocess"]
    pixels = data.pixels()
    assert torch.equal(pixels.images, digits_upsampled(R).images) and torch.equal(pixels.labels, digits().labels)
    idx = torch.arange(100, 140)
    z, cond = data.batch(idx)
    assert torch.equal(cond.labels, digits().labels[idx])
    with torch.no_grad():
        mu = vae.encode(pixels.images[idx]).latent_dist.mean
        direct = vae.decode(z.float() / scaling).sample
    torch.testing.assert_close(z.float(), mu * scaling, rtol=1e-5, atol=1e-5)  # the encoding: μ(x)·s
    decoded = data.decode(z)
    assert decoded.dtype == z.dtype and decoded.shape == (40, 1, R, R)
    torch.testing.assert_close(decoded.float(), direct, rtol=0, atol=1e-5)  # the decoding: D(z / s)


def test_a_vae_that_changed_since_the_encoding_is_refused(vae_run, encoded, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(vae_run, model)
    manifest = json.loads((encoded / "latents.json").read_text())
    folder = tmp_path / "latents"
    shutil.copytree(encoded, folder)
    (folder / "latents.json").write_text(json.dumps(dict(manifest, model=str(model))))
    config = json.loads((model / "vae" / "config.json").read_text())
    (model / "vae" / "config.json").write_text(json.dumps(dict(config, scaling_factor=1.0)))
    with pytest.raises(ConfigError, match="is not the one that encoded") as info:
        LatentArrays(folder).decode(torch.zeros(1, 4, 8, 8))
    assert "vae/config.json" in str(info.value) and "\n" not in str(info.value)


def test_a_one_channel_source_needs_a_one_channel_vae(tmp_path):
    from tests import tiny_diffusers

    model = tiny_diffusers.class_conditional_folder(tmp_path / "cc")  # a 3-channel VAE
    with pytest.raises(ConfigError, match="1-channel images but the VAE") as info:
        encode(model, "digits:16", tmp_path / "out", progress=False)
    assert "\n" not in str(info.value) and not (tmp_path / "out").exists()


LATENT_RUN = """
train.dataset = @latents
latents.folder = '{folder}'
UNet.in_channels = 4
"""


def test_evaluating_a_tiny_latent_run_decodes_its_samples(encoded, classifier, tmp_path, monkeypatch):
    """A teacher trained on the latent digits: its grids and its evaluation are decoded images, its digits-FD is the
    FD of the decoded samples area-averaged to 8×8, and its metrics carry the VAE's reconstruction floor."""
    from PIL import Image

    from tract_repro import launch
    from tract_repro.common.conditioning import Cond
    from tract_repro.evaluation.metrics import evaluate_run, real_set
    from tract_repro.evaluation.runs import load_run
    from tract_repro.sampling import registry
    from tract_repro.sampling.images import grid_image
    from tract_repro.sampling.samplers import noise_from_seeds

    text = tiny_gin("train.method = @TeacherTraining()\nTeacherTraining.sample_steps = 8\n"
                    "inference_ema_momentum.momentum = 0.9", total=256, extra=LATENT_RUN.format(folder=encoded))
    (tmp_path / "t.gin").write_text(text)
    assert launch.main([str(tmp_path / "t.gin"), "--workdir", str(tmp_path / "run")]) == 0
    grid = Image.open(tmp_path / "run" / "samples" / "final_8steps.png")  # 4 decoded 16×16 samples, 4× enlarged
    assert grid.size == tuple(grid_image(torch.zeros(4, 1, R, R), scale=4).shape[1:][::-1])

    calls = []
    decode = LatentArrays.decode

    def recording(self, z):
        x = decode(self, z)
        calls.append((z.clone(), x.clone()))
        return x

    monkeypatch.setattr(LatentArrays, "decode", recording)
    metrics = evaluate_run(tmp_path / "run", steps=(2,), samples=40, classifier=classifier, reference_steps=8,
                           cache=tmp_path / "cache", out=tmp_path / "eval" / "m.json")
    data = LatentArrays(encoded)
    # the reconstruction floor: the decoded latents of the whole real set
    z_all, recon = calls[0]
    assert torch.equal(z_all, data.batch(torch.arange(len(data)))[0])
    model = DigitsClassifier()
    model.load_state_dict(torch.load(classifier / "classifier.pt", weights_only=True))
    floor = reconstruction_floor(model.eval(), data.pixels().images, recon)
    assert metrics["digits_fd_reconstruction_floor"] == pytest.approx(floor["digits_fd_reconstruction_floor"])
    assert metrics["digits_fd_noise_floor"] == pytest.approx(floor["digits_fd_noise_floor"])
    # the samples: latents (40, 4, 8, 8) decoded, the 8-step reference first, then the 2-step samples
    latents = [z for z, x in calls[1:] if z.shape == (40, 4, 8, 8)]
    samples = [x for z, x in calls[1:] if z.shape == (40, 4, 8, 8)]
    assert len(samples) == 2 and all(x.shape == (40, 1, R, R) for x in samples)
    # sampled with x̂ unclipped (latents are unbounded): the 2-step DDIM latents, computed directly
    run = load_run(tmp_path / "run")
    assert run.bounded is False
    direct = registry.sample("ddim", run.denoiser, run.grid, 2, noise_from_seeds(range(40), (4, 8, 8)), Cond(None, {}),
                             clip=False)
    assert torch.equal(latents[1], direct)
    real_stats = real_set(model.eval(), data.pixels())[0]
    features = frechet.custom_features(at_classifier_resolution(samples[1].clamp(-1, 1)), frechet.classifier_feature_fn(model))
    assert metrics["results"][0]["digits_fd"] == pytest.approx(frechet.frechet_distance(frechet.statistics(features),
                                                                                         real_stats))
    rmse = (samples[1].clamp(-1, 1) - samples[0].clamp(-1, 1)).square().mean().sqrt().item()
    assert metrics["results"][0]["fidelity_rmse"] == pytest.approx(rmse)
    assert Image.open(tmp_path / "eval" / "m_2steps.png").size == \
        tuple(grid_image(torch.zeros(40, 1, R, R), scale=2).shape[1:][::-1])
    assert metrics["decoded"]["decoder_sha256"] == data.decoder_digest
    assert metrics["decoded"]["x_hat_clipped"] is False  # latents are sampled unclipped


# ----------------------------------------------------------------------------------- the reconstruction floor


def test_the_reconstruction_floor_on_a_toy_case():
    """A perfect autoencoder scores the noise floor; an imperfect one, FD(its reconstructions of half A, real B)."""
    torch.manual_seed(0)
    model = DigitsClassifier().eval()  # any fixed feature map will do
    real = digits().images
    perfect = reconstruction_floor(model, real, real.clone())
    assert perfect["digits_fd_reconstruction_floor"] == perfect["digits_fd_noise_floor"] > 0
    assert perfect["digits_fd_reconstructions_all"] == pytest.approx(0, abs=1e-6)
    # blockwise the same at 32×32 (the classifier sees their area average)
    assert reconstruction_floor(model, upsample(real, 32), upsample(real, 32))["digits_fd_reconstruction_floor"] == \
        perfect["digits_fd_noise_floor"]
    blurred = 0.5 * real + 0.5 * real.roll(1, dims=-1)  # a poor autoencoder, with values beyond [−1, 1] clipped
    floor = reconstruction_floor(model, real, 1.5 * blurred)
    fn = frechet.classifier_feature_fn(model)
    made, true = frechet.custom_features((1.5 * blurred).clamp(-1, 1), fn), frechet.custom_features(real, fn)
    a, b = (i.numpy() for i in split(len(real), 0, 0.5))
    assert floor["digits_fd_reconstruction_floor"] == frechet.frechet_distance(frechet.statistics(made[a]),
                                                                               frechet.statistics(true[b]))
    assert floor["digits_fd_reconstruction_floor"] > perfect["digits_fd_noise_floor"]
    assert floor["halves"] == [len(a), len(b)] == [899, 898]


def test_the_classifier_reads_only_digits_at_a_multiple_of_8():
    with pytest.raises(ConfigError, match="1-channel square digits") as info:
        at_classifier_resolution(torch.zeros(2, 3, 16, 16))
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError):
        at_classifier_resolution(torch.zeros(2, 1, 12, 12))
    x = torch.arange(16.0).view(1, 1, 4, 4).repeat_interleave(2, -1).repeat_interleave(2, -2)
    assert at_classifier_resolution(torch.nn.functional.pad(x, (0, 8, 0, 8)))[0, 0, :4, :4].tolist() == \
        torch.arange(16.0).view(4, 4).tolist()
    assert isinstance(digits_upsampled(16), ImageArrays)
