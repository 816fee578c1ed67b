"""The latent chain as a user runs it, end to end through the real commands on the CPU: tiny captioned images are
encoded with ``python -m tract_repro.encode_latents`` through the tiny Stable Diffusion folder of
tests/tiny_diffusers.py; Meng et al.'s v fine-tune of that folder trains on the encoding (``train.dataset =
@latents``) through ``python -m tract_repro.launch``; TRACT distils the v teacher run, 64 → 8 → 1 steps, unclipped;
the student, sampled with our DDIM from fixed noise and caption embeddings of the encoding, is exported with
``python -m tract_repro.export --format diffusers`` and the stock ``StableDiffusionPipeline`` loaded from the export
gives the same 1-step latents from the same starting latents, to test_latent_export's float32 tolerance."""
import json
import subprocess
import sys
import types

import numpy as np
import pytest
import torch

from tests import tiny_diffusers as tiny
from tests.test_latent_data import WORDS, _png
from tests.test_latent_engine import ROOT, V_FINE_TUNE, launch
from tests.test_latent_export import SEEDS, close, ours, start
from tract_repro.data.latents import LatentArrays
from tract_repro.evaluation.runs import load_run

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

N = 16
TEXT = (tiny.MAX_TOKENS, tiny.TEXT_WIDTH)
TINY_DATA = "import tests.tiny_latents\ntrain.dataset = @tiny_latents\ntiny_latents.n = 16\ntiny_latents.text_shape = {text}\n"


def swap(text, old, new):
    """``text`` with ``old`` (which must be there) replaced by ``new``."""
    assert old in text, old
    return text.replace(old, new)


def ok(done, what):
    assert done.returncode == 0, f"{what} exited {done.returncode}:\n{done.stderr[-3000:]}"
    return done


def command(module, *args):
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)


def captioned_images(folder):
    """N random PNGs (20 × 24, centre-cropped to 16 × 16 by the encoder) with a captions.jsonl, as a user writes one."""
    rng = np.random.default_rng(0)
    folder.mkdir()
    lines = []
    for i in range(N):
        (folder / f"{i:04d}.png").write_bytes(_png(rng))
        caption = " ".join(rng.choice(WORDS, size=int(rng.integers(1, 6))))
        lines.append(json.dumps({"file": f"{i:04d}.png", "caption": caption}))
    (folder / "captions.jsonl").write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """Steps (1)-(3) as a user runs them: encode, v fine-tune, TRACT; returns the folders."""
    tmp_path = tmp_path_factory.mktemp("chain")
    folder = tiny.stable_diffusion_folder(tmp_path / "sd")  # ε prediction: the v fine-tune changes the head
    images = captioned_images(tmp_path / "images")

    # (1) encode the images and captions once, with the folder's own VAE and text encoder
    encoded = tmp_path / "latents"
    ok(command("tract_repro.encode_latents", "--model", folder, "--source", images, "--out", encoded,
               "--batch", 4, "--shard-size", 8, "--device", "cpu"), "encode_latents")
    data = LatentArrays(encoded)
    assert len(data) == N and data.shape == (tiny.LATENT_CHANNELS, tiny.LATENT_SIZE, tiny.LATENT_SIZE)

    # (2) Meng et al.'s v fine-tune of the folder on the encoding
    on_latents = f"train.dataset = @latents\nlatents.folder = '{encoded}'\n"
    teacher_gin = swap(V_FINE_TUNE.format(folder=folder, text=TEXT), TINY_DATA.format(text=TEXT), on_latents)
    teacher_gin = swap(teacher_gin, "TeacherTraining.p_uncond = 0.25", "TeacherTraining.p_uncond = 0.1")
    (tmp_path / "teacher.gin").write_text(teacher_gin)
    teacher = tmp_path / "teacher"
    ok(launch(tmp_path / "teacher.gin", teacher), "launch (v fine-tune)")
    info = json.loads((teacher / "run.json").read_text())
    assert (info["status"], info["parameterisation"]) == ("complete", "v")

    # (3) TRACT from the v teacher run, 64 → 8 → 1, the teacher's targets unclipped
    tract_gin = swap(teacher_gin, "train.method = @TeacherTraining()\nTeacherTraining.sample_steps = 4\n"
                                  "TeacherTraining.p_uncond = 0.1\n",
                     f"train.method = @TRACT()\nTRACT.schedule = (64, 8, 1)\nTRACT.clip = False\n"
                     f"train.teacher = '{teacher}'\n")
    tract_gin = swap(tract_gin, "train.total = 12", "train.total = 8")
    (tmp_path / "tract.gin").write_text(tract_gin)
    student_dir = tmp_path / "student"
    ok(launch(tmp_path / "tract.gin", student_dir), "launch (TRACT)")
    assert json.loads((student_dir / "run.json").read_text())["status"] == "complete"
    return types.SimpleNamespace(tmp=tmp_path, folder=folder, encoded=encoded, data=data, teacher=teacher,
                                 student=student_dir)


def test_the_latent_chain_runs_as_a_user_runs_it(chain, tmp_path, monkeypatch):
    """(4)-(5): the student sampled by us and, exported, by the stock pipeline, from the same latents."""
    from diffusers import StableDiffusionPipeline

    data, student_dir = chain.data, chain.student

    # (4) our 1-step DDIM of the student from fixed noise and captions of the encoding
    student = load_run(student_dir, with_data=False)
    assert not student.bounded  # latents: sampled unclipped
    noise, latents = start(student)
    cond = data.batch(torch.arange(len(SEEDS)))[1]
    mine = ours(student, 1, noise, cond)
    assert mine.shape == (len(SEEDS), *data.shape) and torch.isfinite(mine).all()

    # (5) export, and the stock pipeline's 1 step from the same latents and caption embeddings
    out = tmp_path / "export"
    ok(command("tract_repro.export", student_dir, "--format", "diffusers", "--out", out), "export")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipe = StableDiffusionPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    theirs = pipe(prompt_embeds=cond.extra["text"].float(), num_inference_steps=1, guidance_scale=1.0,
                  latents=latents, output_type="latent").images
    print("TRACT student from the v fine-tune, K = 1: max |Δ| = %.3g, relative %.3g" % close(theirs, mine))


def _expected_images(chain, student, seeds):
    """Our 1-step DDIM of ``seeds`` with caption s mod N of the encoding, decoded by its VAE and clipped: (S, 3, H, W)."""
    from tract_repro.sampling import registry
    from tract_repro.sampling.samplers import noise_from_seeds

    cond = chain.data.cond([s % N for s in seeds])
    z = registry.sample("ddim", student.denoiser, student.grid, 1, noise_from_seeds(seeds, chain.data.shape), cond,
                        seeds=list(seeds), clip=False)
    return chain.data.decode(z).clamp(-1, 1)


def test_a_text_to_image_student_is_scored_on_decoded_images_with_their_captions(chain, tmp_path):
    """(6) evaluation as ``fid evaluate RUN --prompts FOLDER --clip DIR`` does it, with a stand-in for Inception
    (offline): the reference is the encoded images', samples are decoded latents with caption s mod N for seed s
    (20 seeds wrap the 16 captions), FID and the CLIP score equal a direct computation on those images, and the
    grid carries the captions; ``fid sample --prompts`` dumps the same images with their captions."""
    from PIL import Image

    from tests.test_fid import FakeExtractor
    from tract_repro.evaluation import fid, frechet
    from tract_repro.evaluation.clip_score import ClipScorer
    from tract_repro.evaluation.dump import dump_samples
    from tract_repro.evaluation.inception import ImageFeatures
    from tract_repro.evaluation.references import latent_reference, load_reference
    from tract_repro.sampling.images import to_uint8

    clip = tiny.clip_folder(tmp_path / "clip")
    features = ImageFeatures(FakeExtractor(), resize=lambda a: a, workers=1)
    ref = latent_reference(tmp_path / "ref.npz", chain.encoded, features, batch_size=5)
    stats, meta = load_reference(ref)
    assert meta["images"] == N and tuple(meta["shape"]) == (3, tiny.IMAGE_SIZE, tiny.IMAGE_SIZE)
    real = torch.cat(list(chain.data.image_batches(7)))
    torch.testing.assert_close(real, chain.data.pixels().images.float())  # streamed = the set that was encoded

    seeds = range(20)
    out = tmp_path / "eval" / "fid.json"
    metrics = fid.evaluate_fid(chain.student, (1,), ref, (0,), len(seeds), batch_size=8, extractor_factory=FakeExtractor,
                               resize=lambda a: a, out=out, prompts=chain.encoded, clip=clip)
    student = load_run(chain.student, with_data=False)
    images = _expected_images(chain, student, seeds)
    captions = [chain.data.captions([s % N])[0] for s in seeds]
    row = metrics["results"][0]
    direct_fid = frechet.frechet_distance(frechet.statistics(features(to_uint8(images))), stats)
    assert row["fid"][0] == pytest.approx(direct_fid, rel=1e-9)
    assert row["clip_score"][0] == pytest.approx(ClipScorer(clip)(images, captions)["clip_score"], abs=1e-5)
    assert metrics["prompts"]["wraps"] and metrics["prompts"]["captions"] == N
    assert metrics["decoded"]["x_hat_clipped"] is False and metrics["clip"]["model"]["folder"] == "clip"
    grid = Image.open(out.with_name("fid_1steps.png"))
    assert grid.width == 4 * (tiny.IMAGE_SIZE + 4) + 4 and grid.height > 4 * tiny.IMAGE_SIZE  # 4 a row, text below

    dumped = dump_samples(chain.student, 1, len(seeds), tmp_path / "s.npz", prompts=chain.encoded, batch_size=6)
    assert torch.equal(torch.from_numpy(dumped["arr_0"]).permute(0, 3, 1, 2), to_uint8(images))
    assert list(dumped["captions"]) == captions


def test_a_text_to_image_run_without_its_prompts_stops_in_one_line(chain, tmp_path):
    from tract_repro.common.errors import ConfigError
    from tract_repro.evaluation import fid
    from tract_repro.evaluation.references import save_reference

    ref = save_reference(tmp_path / "ref.npz", np.zeros(5), np.eye(5), protocol="tract", dataset="x", images=1,
                         shape=(3, tiny.IMAGE_SIZE, tiny.IMAGE_SIZE))
    run = dict(run_dir=chain.student, steps=(1,), reference=ref, first_seeds=(0,), samples=4, extractor_factory=object)
    with pytest.raises(ConfigError, match="text-to-image run: give the captions to sample with, --prompts FOLDER"):
        fid.evaluate_fid(**run)
    with pytest.raises(ConfigError, match="--clip scores samples against their captions: give the captions with --prompts"):
        fid.evaluate_fid(**run, clip=tmp_path)
    other = tmp_path / "other"  # an encoding whose text encoder is another one
    other.mkdir()
    for f in chain.encoded.iterdir():
        (other / f.name).write_bytes(f.read_bytes())
    manifest = json.loads((other / "latents.json").read_text())
    key = next(k for k in manifest["files_sha256"] if k.startswith("text_encoder/"))
    manifest["files_sha256"][key] = "0" * 64
    (other / "latents.json").write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match="was encoded with the text encoder of .*encode the prompts with its model"):
        fid.evaluate_fid(**run, prompts=other)
    assert not (chain.student / "eval").exists()  # nothing written
    assert fid.main(["reference", "latents", "--out", str(tmp_path / "r.npz")]) == 2  # --root is required


#: the only bindings that take the paper-scale SD 1.5 run files down to the tiny chain on the CPU: its folders, sizes
#: and cadences; everything else (data, network, schedule, method, weighting, precision switches) is the files' own
TINY_SD15 = ["train.batch_size = 4", "train.threads = 1", "train.checkpoint_every = 4", "train.log_every = 4",
             "train.grid_every = None", "train.tensorboard = False", "Device.name = 'cpu'", "Device.autocast = None",
             "Device.tf32 = False"]


def test_the_paper_scale_sd15_run_files_train_the_tiny_chain_unchanged(chain, tmp_path):
    """gin/sd15_v_finetune.gin and gin/sd15_tract.gin, as `dvc repro sd15` runs them, with only folders, sizes and
    the CPU bound: the same code path as the paper scale (latents, diffusers folder, its schedule, gradient
    checkpointing, the v fine-tune and TRACT unclipped)."""
    folders = [f"MODEL = '{chain.folder}'", f"DATA = '{chain.encoded}'"]
    runs = {"v": (["gin/sd15_v_finetune.gin"], ["TOTAL = '8'", "learning_rate.warmup = 0"]),
            "tract": (["gin/sd15_tract.gin"], [f"TEACHER = '{chain.teacher}'", "T = 64", "SCHEDULE = (64, 8, 1)",
                                               "TOTAL = '8'"])}
    for name, (files, sizes) in runs.items():
        args = [*files, *[a for b in folders + sizes + TINY_SD15 for a in ("--gin", b)], "--workdir", tmp_path / name]
        ok(command("tract_repro.launch", *args), f"launch {files[0]}")
        info = json.loads((tmp_path / name / "run.json").read_text())
        assert info["status"] == "complete" and info["bounded"] is False
        assert info["noise_schedule"] == "DiscreteSchedule" and info["parameterisation"] == "v"
    assert json.loads((tmp_path / "tract" / "run.json").read_text())["method"] == "TRACT"


def test_an_encoding_submitted_as_a_job_equals_the_inline_one(chain, tmp_path):
    """``encode_latents --executor local`` (a submitit job, waited for) writes the same bytes as the inline run."""
    out = tmp_path / "latents"
    ok(command("tract_repro.encode_latents", "--model", chain.folder, "--source", chain.tmp / "images", "--out", out,
               "--batch", 4, "--shard-size", 8, "--device", "cpu", "--executor", "local",
               "--gin", "local_executor.gpus_per_node = 0"), "encode_latents --executor local")
    mine = sorted(p.name for p in chain.encoded.iterdir() if p.suffix == ".npy")
    assert mine and sorted(p.name for p in out.iterdir() if p.suffix == ".npy") == mine
    for name in mine:
        assert (out / name).read_bytes() == (chain.encoded / name).read_bytes(), name


def test_the_stochastic_sampler_runs_on_latents_unclipped(chain):
    """Meng et al.'s stochastic sampler on the latent student, 2 steps, as its definition writes it out: a DDIM jump
    λ₀ → λ₂ with x̂ unclipped, re-noising to λ₁ with seed j's ξ, then the last DDIM step λ₁ → λ₂."""
    from tract_repro.diffusion.ddim import ddim_step
    from tract_repro.sampling import registry
    from tract_repro.sampling.samplers import noise_from_seeds
    from tract_repro.sampling.stochastic import renoise, seeded_noise

    student = load_run(chain.student, with_data=False)
    seeds, shape = [3, 4], chain.data.shape
    cond = chain.data.cond([0, 1])
    z = noise_from_seeds(seeds, shape)
    got = registry.sample("stochastic", student.denoiser, student.grid, 2, z, cond, seeds=seeds, clip=False)
    lam = registry.get("stochastic").logsnrs(student.grid, 2)
    (a0, s0), (a1, s1), (a2, s2) = (student.grid.alpha_sigma(lam[i:i + 1]) for i in range(3))
    x = s0 * z
    x_hat = student.denoiser(x, lam[0].expand(2), cond)
    assert x_hat.abs().max() > 1  # latents: clipping would change the result
    x = ddim_step(x, x_hat, a0, s0, a2, s2, clip=False)
    x = renoise(x, lam[2].expand(2), lam[1].expand(2), student.grid.alpha_sigma, seeded_noise(seeds, shape)(0, x))
    x = ddim_step(x, student.denoiser(x, lam[1].expand(2), cond), a1, s1, a2, s2, clip=False)
    torch.testing.assert_close(got, x, rtol=0, atol=1e-12)
