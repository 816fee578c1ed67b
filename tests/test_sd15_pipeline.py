"""Stable Diffusion 1.5 at paper scale (`dvc repro sd15`): the chain check → encode → reference → v fine-tune →
BTD and TRACT → FID-30K and CLIP score → table, the one line it stops with offline, the check passing on tiny real
inputs, and COCO 2014 validation turned into an evaluation caption set."""
import json

import numpy as np
import pytest
from PIL import Image

from tests.test_paper_pipeline import expansion, in_repo, repro_offline, stages  # noqa: F401 (fixtures)
from tract_repro.common.errors import ConfigError
from tract_repro.data import coco
from tract_repro.results import check
from tract_repro.results.experiments import load_tables
from tract_repro.results.paper_stages import latent_folder


def test_the_sd15_chain_from_check_to_table(stages, expansion):
    phases, teachers, evaluations = expansion
    evaluations = [e for e in evaluations if e["table"] == "sd15"]
    check_cmd = stages["paper_check_sd15"]["cmd"]
    for option in ("--teacher ${paper.teachers.sd15}", "--data ${paper.data.sd15}",
                   "--prompts-data ${paper.data.coco2014_val}", "--clip ${paper.text_to_image.clip}"):
        assert option in check_cmd
    train, prompts = stages["paper_encode_sd15_train"], stages["paper_encode_sd15_prompts"]
    assert "--source ${paper.data.sd15} --out runs/paper/latents/sd15_train --resolution 512" in train["cmd"]
    assert "--source ${paper.data.coco2014_val} --out runs/paper/latents/sd15_prompts" in prompts["cmd"]
    assert "runs/paper/checks/sd15/teacher.json" in train["deps"] and train["outs"][0][latent_folder("sd15", "train")]["persist"]
    reference = stages["paper_fid_ref_sd15"]
    assert "reference latents --root runs/paper/latents/sd15_prompts" in reference["cmd"]
    assert reference["deps"] == ["runs/paper/latents/sd15_prompts"]
    v = stages["paper_train_sd15_v"]  # the v fine-tune: from the params' folder, on the encoded shards
    assert "gin/sd15_v_finetune.gin" in v["cmd"] and "MODEL = '${paper.teachers.sd15}'" in v["cmd"]
    assert "DATA = 'runs/paper/latents/sd15_train'" in v["cmd"] and "TEACHER" not in v["cmd"]
    assert set(v["deps"]) >= {"runs/paper/latents/sd15_train", "runs/paper/checks/sd15/teacher.json"}
    assert teachers["sd15_v"]["setup"] == "sd15" and teachers["sd15_v"]["trains"]
    by_row = {e["row"]: e for e in evaluations}
    assert {e["setup"] for e in evaluations} == {"sd15"}
    for row, steps in (("tract_1step", 1), ("tract_2steps", 2), ("btd_1step", 1), ("btd_8steps", 8)):
        first = phases[by_row[row]["target"]]
        while first.previous is not None:
            first = first.previous
        cmd = stages[f"paper_run_{first.key}"]["cmd"]
        assert "TEACHER = 'runs/paper/sd15_v'" in cmd and "DATA = 'runs/paper/latents/sd15_train'" in cmd, row
        evaluation = stages[f"paper_eval_{by_row[row]['target']}"]
        assert f"--steps {steps}" in str(evaluation["cmd"]) and "${paper.fid} ${paper.text_to_image} --prompts " \
            "runs/paper/latents/sd15_prompts" in str(evaluation["cmd"]), row
        assert "runs/paper/latents/sd15_prompts" in evaluation["deps"] and "paper.text_to_image" in evaluation["params"]
    # TRACT's two rows share their first phase; BTD's nine halvings and TRACT's two phases see the same samples
    assert phases[by_row["tract_1step"]["target"]].previous is phases[by_row["tract_2steps"]["target"]].previous
    assert "_n10240000_" in by_row["btd_1step"]["target"] and "_n1024000_" in by_row["btd_8steps"]["target"]
    assert stages["sd15"]["outs"] == [{"results/sd15.md": {"cache": False}}]


def test_btd_and_tract_train_on_the_same_number_of_samples(in_repo):
    from tract_repro import config
    from tract_repro.methods.phases import plan_phases

    totals = {}
    for gin_file in ("gin/sd15_btd.gin", "gin/sd15_tract.gin"):
        config.parse([gin_file])
        method = config.build("train.method")
        phases = plan_phases(method.steps(config.query("train.T")), config.query("train.total"),
                             config.query("train.phase_lengths"))
        totals[gin_file] = sum(p.length for p in phases)
    assert totals["gin/sd15_btd.gin"] == totals["gin/sd15_tract.gin"] == 36_000 * 1024


def test_dvc_repro_sd15_offline_fails_fast_in_one_line(tmp_path):
    """No model folder, shards, COCO captions, CLIP or Inception weights: the check names each, in one line."""
    done, errors = repro_offline(tmp_path, "sd15")
    assert len(errors) == 1, done.stdout + done.stderr
    for needed in ("ckpts/stable-diffusion-v1-5", "huggingface-cli download stable-diffusion-v1-5/stable-diffusion-v1-5",
                   "data/sd15_shards", "data/coco2014_val", "python -m tract_repro.data.coco",
                   "ckpts/clip-vit-large-patch14", "openai/clip-vit-large-patch14", "pt_inception-2015-12-05-6726825d.pth"):
        assert needed in errors[0], needed
    assert "Running stage 'paper_check_sd15'" in done.stdout and "paper_encode_" not in done.stdout
    assert not (tmp_path / "runs" / "paper" / "checks" / "sd15" / "data.json").exists()


def _shard(path):
    import io

    import webdataset as wds

    rng = np.random.default_rng(0)
    path.parent.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(path)) as sink:
        for i in range(3):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(buf, format="PNG")
            sink.write({"__key__": f"{i:04d}", "png": buf.getvalue(), "txt": "a cat"})
    return path


def test_the_sd15_check_passes_on_tiny_real_inputs_and_refuses_pickled_weights(tmp_path):
    pytest.importorskip("diffusers")
    from tests import tiny_diffusers as tiny

    model = tiny.stable_diffusion_folder(tmp_path / "sd")
    shards = _shard(tmp_path / "shards" / "00000.tar").parent
    prompts = tmp_path / "coco"
    prompts.mkdir()
    (prompts / "captions.jsonl").write_text('{"file": "a.png", "caption": "a cat"}\n')
    clip = tiny.clip_folder(tmp_path / "clip")
    (tmp_path / "pt_inception-2015-12-05-6726825d.pth").write_bytes(b"weights")
    args = ["sd15", "--data", str(shards), "--teacher", str(model), "--prompts-data", str(prompts), "--clip", str(clip),
            "--inception", str(tmp_path), "--out", str(tmp_path / "out")]
    assert check.main(args) == 0
    data = json.loads((tmp_path / "out" / "data.json").read_text())
    teacher = json.loads((tmp_path / "out" / "teacher.json").read_text())
    assert data["files"] == [["00000.tar", (shards / "00000.tar").stat().st_size]]
    assert teacher["sha256"] == check.sha256(model / "model_index.json")
    assert ["unet/diffusion_pytorch_model.safetensors", (model / "unet" / "diffusion_pytorch_model.safetensors").stat().st_size] \
        in teacher["files"]
    weights = model / "unet" / "diffusion_pytorch_model.safetensors"
    weights.rename(weights.with_suffix(".bin"))  # only a pickle left: refused, not loaded
    problems = check.check("sd15", shards, model, tmp_path, prompts=prompts, clip=clip)[0]
    assert problems == [f"Stable Diffusion 1.5 diffusers folder {model}/unet has no diffusion_pytorch_model.safetensors "
                        f"(pickled weights are not loaded): huggingface-cli download stable-diffusion-v1-5/"
                        f"stable-diffusion-v1-5 --exclude '*.bin' '*.ckpt' '*.fp16.*' --local-dir {model}"]


def _coco(tmp_path, n_images=6):
    images = tmp_path / "val2014"
    images.mkdir()
    annotations = {"images": [], "annotations": []}
    for i in range(n_images):
        name = f"COCO_val2014_{i:012d}.jpg"
        Image.new("RGB", (20, 16), (i * 40, 0, 0)).save(images / name)
        annotations["images"].append({"id": 100 + i, "file_name": name})
        for j in range(2):
            annotations["annotations"].append({"image_id": 100 + i, "id": 10 * i + j, "caption": f"image {i}  caption {j}\n"})
    path = tmp_path / "captions_val2014.json"
    path.write_text(json.dumps(annotations))
    return path, images


def test_coco_becomes_a_caption_set_drawn_once_with_one_caption_per_image(tmp_path):
    from tract_repro.data.latent_sources import open_source

    annotations, images = _coco(tmp_path)
    pairs = coco.write_caption_set(annotations, images, tmp_path / "a", samples=4, seed=3)
    again = coco.draw(coco.read_annotations(annotations), 4, seed=3)
    assert pairs == again and len({f for f, _ in pairs}) == 4  # the same draw; distinct images
    for name, caption in pairs:
        i = int(name[-16:-4])
        assert caption in (f"image {i} caption 0", f"image {i} caption 1")  # one of its own, whitespace normalised
    source = open_source(str(tmp_path / "a"))  # what encode_latents reads, images found through the relative paths
    assert source.captions() == [c for _, c in pairs] and len(list(source.items())) == 4
    assert json.loads((tmp_path / "a" / "selection.json").read_text())["seed"] == 3
    assert coco.draw(coco.read_annotations(annotations), 4, seed=4) != pairs


@pytest.mark.parametrize("case, says", [
    ("exists", "captions.jsonl exists: choose a new --out"),
    ("missing_image", "drawn images are missing from"),
    ("too_many", "--samples 7: choose 1 to 6"),
    ("not_coco", "is not a COCO captions file"),
])
def test_a_bad_coco_input_stops_in_one_line_before_anything_is_written(tmp_path, case, says):
    annotations, images = _coco(tmp_path)
    out, samples = tmp_path / "out", 6
    if case == "exists":
        out.mkdir()
        (out / "captions.jsonl").write_text("mine\n")
    elif case == "missing_image":
        next(images.iterdir()).unlink()
    elif case == "too_many":
        samples = 7
    else:
        annotations.write_text('{"images": []}')
    with pytest.raises(ConfigError, match=says.replace("-", r"\-")):
        coco.write_caption_set(annotations, images, out, samples=samples)
    assert not (out / "selection.json").exists()
    if case == "exists":
        assert (out / "captions.jsonl").read_text() == "mine\n"


def test_guided_sd_distils_guidance_from_the_shared_v_fine_tune_and_scores_every_w(stages, expansion):
    phases, teachers, evaluations = expansion
    evaluations = [e for e in evaluations if e["table"] == "guided_sd"]
    assert teachers["sd15_guided_stage1"]["teacher_run"] == "sd15_v" and teachers["sd15_guided_stage1"]["setup"] == "sd15"
    stage1 = stages["paper_train_sd15_guided_stage1"]
    assert "gin/sd15_guided_stage1.gin" in stage1["cmd"] and "TEACHER = 'runs/paper/sd15_v'" in stage1["cmd"]
    assert "runs/paper/sd15_v" in stage1["deps"]
    assert {e["w"] for e in evaluations} == {2, 4, 6, 8, 10, 14}  # paper.w: Meng et al.'s text-to-image range
    row = next(e for e in evaluations if e["row"] == "tract_2steps@w6")
    first = phases[row["target"]].previous
    assert "TEACHER = 'runs/paper/sd15_guided_stage1'" in stages[f"paper_run_{first.key}"]["cmd"]
    evaluation = str(stages[f"paper_eval_{row['target']}"]["cmd"])
    assert "--w 2 4 6 8 10 14" in evaluation and "--prompts runs/paper/latents/sd15_prompts" in evaluation
    # the v fine-tune is one stage for both tables, evaluated unguided (sd15) and at every w (guided_sd)
    v_eval = stages["paper_eval_sd15_v"]["cmd"]
    assert isinstance(v_eval, list) and any("--w 2 4 6 8 10 14" in c for c in v_eval) and any("--w" not in c for c in v_eval)


def test_guided_sd_reports_the_clip_score_and_plots_fid_against_it(tmp_path):
    from tract_repro.results import guided_paper

    table = load_tables()["guided_sd"]
    records = [dict(row="teacher_64", w=w, sampler="ddim", nfe=128, protocol="tract", fid_mean=fid, fid_std=None,
                    fid=[fid], fid_headline=fid, is_mean=None, is_std=None, clip_mean=clip, clip_std=None,
                    samples_per_range=30000) for w, fid, clip in ((2, 12.5, 30.25), (14, 25.0, 32.75))]
    text = guided_paper.render_paper(table, records)
    clip_section = text.split("## CLIP score")[1]
    assert "30.25" in clip_section and "32.75" in clip_section and "12.50" in text.split("## Inception")[0]
    guided_paper.plot_tradeoff(table, records, tmp_path / "tradeoff.png")
    assert Image.open(tmp_path / "tradeoff.png").size[0] > 100


def test_dvc_repro_guided_sd_offline_fails_at_the_sd15_check_in_one_line(tmp_path):
    done, errors = repro_offline(tmp_path, "guided_sd")
    assert len(errors) == 1 and "ckpts/stable-diffusion-v1-5" in errors[0] and "data/coco2014_val" in errors[0]
    assert "Running stage 'paper_check_sd15'" in done.stdout and "paper_train_" not in done.stdout


def test_guided_sd_stochastic_rows_add_one_phase_to_the_btd_chain_and_sample_with_the_stochastic_sampler(stages, expansion):
    """Meng et al.'s stochastic N-step sampler (N = 8, 4, 2): the deterministic BTD chain down to N steps, shared with
    the BTD rows, then one more phase N → N/2 with STOCHASTIC = True; evaluated with `--sampler stochastic` at N
    steps and every w; each beats the deterministic N-step row in the table's ordering."""
    phases, _, evaluations = expansion
    by_row = {e["row"]: e for e in evaluations if e["table"] == "guided_sd"}
    table = load_tables()["guided_sd"]
    for n in (8, 4, 2):
        row, deterministic = by_row[f"btd_stochastic_{n}steps@w6"], by_row[f"btd_{n}steps@w6"]
        assert row["sampler"] == "stochastic" and row["steps"] == n and deterministic["sampler"] == "ddim"
        last = phases[row["target"]]
        assert last.previous is phases[deterministic["target"]]  # the N-step student of the shared chain
        assert last.key.startswith("sd15_guided_btd_512-") and last.key.split("_n")[0].endswith(f"-{n}-{n // 2}")
        cmd = stages[f"paper_run_{last.key}"]["cmd"]
        assert "STOCHASTIC = True" in cmd and f"FINAL_STEPS = {n // 2}" in cmd and f"train.only_phase = {last.index}" in cmd
        evaluation = str(stages[f"paper_eval_{row['target']}"]["cmd"])
        assert f"--steps {n} --sampler stochastic --w 2 4 6 8 10 14" in evaluation
        assert "--prompts runs/paper/latents/sd15_prompts" in evaluation
        assert [f"btd_stochastic_{n}steps", f"btd_{n}steps"] in table["ordering"]["pairs"]
    # one chain: 512 → 8 shared by every BTD row, then a deterministic and a stochastic phase at 8→4, 4→2 and 2→1
    btd = [key for key in phases if key.startswith("sd15_guided_btd_")]
    assert len(btd) == 6 + 2 * 3
