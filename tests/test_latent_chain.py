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


def test_the_latent_chain_runs_as_a_user_runs_it(tmp_path, monkeypatch):
    from diffusers import StableDiffusionPipeline

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
