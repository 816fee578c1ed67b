"""Class-conditional latent guided distillation on ImageNet 256×256 at paper scale (`dvc repro
guided_latent_imagenet256`): the chain check → encode → reference → v fine-tune → stage 1 → BTD and TRACT → FID and
IS at every w → table, the one line it stops with offline, and the check passing on a tiny real DiT folder and tiny
WebDataset shards with class labels.  Nothing here depends on the DiT's w input (networks/diffusers_net.py)."""
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests import test_paper_pipeline as paper
from tract_repro.results import check
from tract_repro.results.experiments import load_tables
from tract_repro.results.paper_stages import latent_folder

#: the paper pipeline's fixtures and helpers
stages, expansion, in_repo, repro_offline, ROOT = (paper.stages, paper.expansion, paper.in_repo, paper.repro_offline,
                                                   paper.ROOT)
TABLE = "guided_latent_imagenet256"
WS = "--w 0 1 2 4 8 14"


def _first(phase):
    while phase.previous is not None:
        phase = phase.previous
    return phase


def test_the_imagenet256_chain_from_check_to_table(stages, expansion):
    phases, teachers, evaluations = expansion
    evaluations = [e for e in evaluations if e["table"] == TABLE]
    assert {e["setup"] for e in evaluations} == {"imagenet256"}
    check_cmd = stages["paper_check_imagenet256"]["cmd"]
    assert "--data ${paper.data.imagenet256}" in check_cmd and "--teacher ${paper.teachers.imagenet256}" in check_cmd
    assert "--prompts-data" not in check_cmd and "--clip" not in check_cmd  # class-conditional: no captions, no CLIP
    # only the training shards are encoded, at 256 with all 1000 classes
    assert "paper_encode_imagenet256_prompts" not in stages
    train = stages["paper_encode_imagenet256_train"]
    assert "--source ${paper.data.imagenet256} --out runs/paper/latents/imagenet256_train --resolution 256 " \
        "--num-classes 1000" in train["cmd"]
    assert "runs/paper/checks/imagenet256/teacher.json" in train["deps"]
    assert train["outs"][0][latent_folder("imagenet256", "train")]["persist"]
    # the FID reference: the training images the encoder read (ImageNet train, as ADM's and DiT's references)
    reference = stages["paper_fid_ref_imagenet256"]
    assert "reference latents --root runs/paper/latents/imagenet256_train" in reference["cmd"]
    assert reference["deps"] == ["runs/paper/latents/imagenet256_train"]
    # the v fine-tune from the params' DiT folder on the encoded shards, stage 1 from it
    v = stages["paper_train_imagenet256_v"]
    assert "gin/imagenet256_v_finetune.gin" in v["cmd"] and "MODEL = '${paper.teachers.imagenet256}'" in v["cmd"]
    assert "DATA = 'runs/paper/latents/imagenet256_train'" in v["cmd"] and "TEACHER" not in v["cmd"]
    assert set(v["deps"]) >= {"runs/paper/latents/imagenet256_train", "runs/paper/checks/imagenet256/teacher.json"}
    stage1 = stages["paper_train_imagenet256_guided_stage1"]
    assert "gin/imagenet256_guided_stage1.gin" in stage1["cmd"] and "TEACHER = 'runs/paper/imagenet256_v'" in stage1["cmd"]
    assert "runs/paper/imagenet256_v" in stage1["deps"]
    assert teachers["imagenet256_guided_stage1"]["teacher_run"] == "imagenet256_v"
    assert teachers["imagenet256_v"]["setup"] == "imagenet256" and teachers["imagenet256_v"]["trains"]
    # stage 2 from stage 1; every row evaluated by FID (and IS) at every w, no captions
    by_row = {e["row"]: e for e in evaluations}
    assert {e["w"] for e in evaluations} == {0, 1, 2, 4, 8, 14}
    for row, steps in (("btd_8steps", 8), ("btd_1step", 1), ("tract_2steps", 2), ("tract_1step", 1)):
        target = by_row[f"{row}@w4"]["target"]
        first = _first(phases[target])
        cmd = stages[f"paper_run_{first.key}"]["cmd"]
        assert "TEACHER = 'runs/paper/imagenet256_guided_stage1'" in cmd, row
        assert "DATA = 'runs/paper/latents/imagenet256_train'" in cmd, row
        evaluation = stages[f"paper_eval_{target}"]
        assert f"--steps {steps} {WS}" in evaluation["cmd"], row
        assert "--reference runs/paper/fid_ref/imagenet256.npz ${paper.fid} --inception" in evaluation["cmd"], row
        assert "text_to_image" not in evaluation["cmd"] and "--prompts" not in evaluation["cmd"], row
        assert len(evaluation["metrics"]) == 6, row  # one metrics file per w
    # the guided teacher at 64 steps and at the students' 4, 2 and 1 DDIM steps: one command
    assert f"--steps 64 4 2 1 {WS}" in stages["paper_eval_imagenet256_v"]["cmd"]
    assert f"--steps 64 {WS}" in stages["paper_eval_imagenet256_guided_stage1"]["cmd"]
    # TRACT's rows share their first phase (512 → 32); BTD's nine halvings and TRACT see the same samples
    assert phases[by_row["tract_1step@w0"]["target"]].previous is phases[by_row["tract_4steps@w0"]["target"]].previous
    assert "_n10240000_" in by_row["btd_1step@w0"]["target"] and "_n1024000_" in by_row["btd_8steps@w0"]["target"]
    table = stages[TABLE]
    assert table["cmd"] == f"python -m tract_repro.results.tables {TABLE} --paper-scale"
    assert table["outs"] == [{f"results/{TABLE}.md": {"cache": False}}]
    assert f"experiments/{TABLE}.yaml" in table["deps"]


def test_the_gin_files_mirror_guided_sd_with_w_in_0_14(in_repo):
    from tract_repro import config
    from tract_repro.methods.phases import plan_phases

    totals = {}
    for gin_file in ("gin/imagenet256_guided_btd.gin", "gin/imagenet256_guided_tract.gin"):
        config.parse([gin_file])
        method = config.build("train.method")
        assert tuple(method.guidance) == (0.0, 14.0), gin_file
        assert config.query("diffusers_network.time_cond_proj_dim") == 256
        assert config.query("train.T") == 512 and config.query("train.parameterisation") == "v"
        steps = method.steps(config.query("train.T"))
        assert steps[0] == 512 and steps[-1] == 1, gin_file
        totals[gin_file] = sum(p.length for p in plan_phases(steps, config.query("train.total"),
                                                             config.query("train.phase_lengths")))
    assert set(totals.values()) == {36_000 * 1024}
    config.parse(["gin/imagenet256_guided_stage1.gin"])
    assert (config.query("GuidedDistillation.w_min"), config.query("GuidedDistillation.w_max")) == (0.0, 14.0)
    assert config.query("diffusers_network.time_cond_proj_dim") == 256
    for gin_file in ("gin/imagenet256_v_finetune.gin", "gin/imagenet256_guided_stage1.gin"):
        text = Path(gin_file).read_text()
        assert text.index("# Required settings") < text.index("include 'imagenet256/base.gin'"), gin_file
        assert "MODEL = 'ckpts/DiT-XL-2-256'" in text and "DATA = 'runs/paper/latents/imagenet256_train'" in text


def test_dvc_repro_guided_latent_imagenet256_offline_fails_fast_in_one_line(tmp_path):
    """No DiT folder, shards or Inception weights: the check names each and how to fetch it, in one line, and
    nothing is written."""
    done, errors = repro_offline(tmp_path, TABLE)
    assert len(errors) == 1, done.stdout + done.stderr
    for needed in ("ckpts/DiT-XL-2-256", "huggingface-cli download facebook/DiT-XL-2-256 --local-dir ckpts/DiT-XL-2-256",
                   "data/imagenet256_shards", "key.cls", "timm/imagenet-1k-wds", "pt_inception-2015-12-05-6726825d.pth"):
        assert needed in errors[0], needed
    assert "coco" not in errors[0].lower() and "clip" not in errors[0].lower()  # class-conditional: no captions, no CLIP
    assert "Running stage 'paper_check_imagenet256'" in done.stdout and "paper_encode_" not in done.stdout
    assert not (tmp_path / "runs").exists()


def _shards(folder, n=4, classes=10):
    import webdataset as wds

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(folder / "imagenet1k-train-0000.tar")) as sink:
        for i in range(n):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(buf, format="JPEG")
            sink.write({"__key__": f"{i:04d}", "jpg": buf.getvalue(), "cls": str(i % classes).encode()})
    return folder


def test_the_imagenet256_check_passes_on_a_tiny_dit_folder_and_labelled_shards(tmp_path):
    pytest.importorskip("diffusers")
    from tests.test_latent_dit import dit_folder
    from tract_repro.data.latent_sources import open_source

    model = dit_folder(tmp_path / "dit", legacy=True)  # as facebook/DiT-XL-2-256 names its transformer
    shards = _shards(tmp_path / "shards")
    assert [item.label for item in open_source(str(shards)).items()] == [0, 1, 2, 3]  # key.cls read as the label
    (tmp_path / "pt_inception-2015-12-05-6726825d.pth").write_bytes(b"weights")
    args = ["imagenet256", "--data", str(shards), "--teacher", str(model), "--inception", str(tmp_path),
            "--out", str(tmp_path / "out")]
    assert check.main(args) == 0
    data = json.loads((tmp_path / "out" / "data.json").read_text())
    teacher = json.loads((tmp_path / "out" / "teacher.json").read_text())
    assert data["files"] == [["imagenet1k-train-0000.tar", (shards / "imagenet1k-train-0000.tar").stat().st_size]]
    assert teacher["sha256"] == check.sha256(model / "model_index.json")
    assert any(name.startswith("transformer/diffusion_pytorch_model") for name, _ in teacher["files"])
    fetch = f"huggingface-cli download facebook/DiT-XL-2-256 --local-dir {model}"
    (model / "scheduler").rename(tmp_path / "scheduler")
    assert check.check("imagenet256", shards, model, tmp_path)[0] == \
        [f"DiT-XL/2 256×256 diffusers folder {model} has no scheduler/: {fetch}"]
    (tmp_path / "scheduler").rename(model / "scheduler")
    for weights in (model / "vae").glob("diffusion_pytorch_model*"):
        weights.unlink()
    assert check.check("imagenet256", shards, model, tmp_path)[0] == \
        [f"DiT-XL/2 256×256 diffusers folder {model}/vae has no diffusion_pytorch_model weights: {fetch}"]
    problems = check.check("imagenet256", tmp_path / "none", tmp_path / "nothing", tmp_path)[0]
    assert len(problems) == 2 and "no model_index.json" in problems[1] and "key.cls" in problems[0]


def test_the_committed_table_is_empty_but_honest(in_repo):
    from tract_repro.results import guided_paper

    table = load_tables()[TABLE]
    text = guided_paper.render_paper(table, [])
    assert (ROOT / "results" / f"{TABLE}.md").read_text() == text
    assert "## FID (lower is better)" in text and "## Inception Score (higher is better)" in text
    assert "CLIP" not in text  # class-conditional: FID and IS only
    assert "Nothing measured at paper scale yet" in text
    assert all(row["paper"]["value"] is None for row in table["rows"])
