"""Latent data for latent diffusion through diffusers: image–caption sources (a folder with captions.jsonl and
WebDataset shards), the encoding stage (the model folder's own VAE and text encoder, exact resume) and the
memory-mapped data set, on the tiny real folders of tests/tiny_diffusers.py and 20 generated 20×24 PNGs."""
import io
import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from tests import tiny_diffusers
from tract_repro.common.conditioning import Cond
from tract_repro.common.errors import ConfigError
from tract_repro.data import latent_store as store
from tract_repro.data.latent_encoding import encode
from tract_repro.data.latent_models import posterior_noise
from tract_repro.data.latent_sources import open_source, prepare
from tract_repro.data.latents import LatentArrays, latents
from tract_repro.encode_latents import main

N, SHARD, BATCH = 20, 8, 3  # 3 shards (8, 8, 4); batches of 3 inside each
R = tiny_diffusers.IMAGE_SIZE
WORDS = ["the", "cat", "dog", "sits", "on", "a", "mat", "digits", "and", "giant", "thing"]


def _png(rng):
    """A random 20 × 24 (W × H) RGB PNG: the centre square is cropped and resized to 16 × 16."""
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (24, 20, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {"sd": tiny_diffusers.stable_diffusion_folder(root / "sd"),
            "cc": tiny_diffusers.class_conditional_folder(root / "cc")}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The same 20 images, captions and labels as a folder with captions.jsonl and as two WebDataset shards."""
    import webdataset as wds

    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    images = [_png(rng) for _ in range(N)]
    captions = [" ".join(rng.choice(WORDS, size=int(rng.integers(1, 6)))) for _ in range(N)]
    labels = [int(v) for v in rng.integers(0, 7, N)]
    folder = root / "folder"
    folder.mkdir()
    lines = []
    for i in range(N):
        (folder / f"{i:04d}.png").write_bytes(images[i])
        lines.append(json.dumps({"file": f"{i:04d}.png", "caption": captions[i], "label": labels[i]}))
    (folder / "captions.jsonl").write_text("\n".join(lines) + "\n")
    shards = root / "shards"
    shards.mkdir()
    for s, rows in enumerate([range(0, 12), range(12, N)]):
        with wds.TarWriter(str(shards / f"{s:05d}.tar")) as sink:
            for i in rows:  # the first shard with .txt and .cls, the second with .json
                fields = {"txt": captions[i], "cls": str(labels[i])} if s == 0 else \
                    {"json": json.dumps({"caption": captions[i], "label": labels[i]}).encode()}
                sink.write({"__key__": f"{i:06d}", "png": images[i], **fields})
    return dict(folder=folder, shards=shards, images=images, captions=captions, labels=labels, root=root)


def _encode(model, source, out, **options):
    return encode(model, source, out, **{"shard_size": SHARD, "batch": BATCH, "progress": False, **options})


@pytest.fixture(scope="module")
def sd_latents(models, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("encoded") / "sd"
    _encode(models["sd"], data["folder"], out)
    return out


def _files(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _vae(model):
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(model / "vae", use_safetensors=True).eval()


def test_prepare_takes_the_centred_square_and_resizes_it():
    """A 20 × 24 image whose top and bottom 2 rows are red and the rest green: the prepared image is all green."""
    pixels = np.zeros((24, 20, 3), dtype=np.uint8)
    pixels[:, :, 1] = 255
    pixels[:2, :, :] = pixels[-2:, :, :] = (255, 0, 0)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    x = prepare(buf.getvalue(), R)
    assert x.shape == (3, R, R) and x.dtype == np.float32
    np.testing.assert_allclose(x[0], -1.0, atol=1e-6)
    np.testing.assert_allclose(x[1], 1.0, atol=1e-6)
    big = prepare(buf.getvalue(), 64)  # upsampled (antialiased bicubic) stays in [−1, 1]
    assert big.shape == (3, 64, 64) and big.min() >= -1.0 and big.max() <= 1.0


def test_latents_are_the_posterior_mean_times_the_scaling_factor(models, data, sd_latents):
    ds = LatentArrays(sd_latents)
    vae = _vae(models["sd"])
    x = torch.from_numpy(np.stack([prepare(b, R) for b in data["images"]]))
    with torch.no_grad():
        direct = vae.encode(x).latent_dist.mean * vae.config.scaling_factor
    z, cond = ds.batch(torch.arange(N))
    assert z.dtype == torch.float64 and z.shape == (N, 4, 8, 8) and ds.shape == (4, 8, 8) and len(ds) == N
    torch.testing.assert_close(z, direct.double(), rtol=1e-5, atol=1e-5)
    assert ds.scaling_factor == pytest.approx(0.18215) and ds.manifest["posterior"] == "mean"
    m = ds.manifest
    assert (m["resolution"], m["count"], m["shard_size"], m["source"]["kind"]) == (R, N, SHARD, "folder")
    assert set(m["files_sha256"]) >= {"vae/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"}


def test_embeddings_are_the_text_encoders_last_hidden_state(models, data, sd_latents):
    from transformers import CLIPTextModel, CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(models["sd"] / "tokenizer")
    te = CLIPTextModel.from_pretrained(models["sd"] / "text_encoder", use_safetensors=True).eval()

    def embed(prompts):
        ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids
        with torch.no_grad():
            return te(ids).last_hidden_state

    ds = LatentArrays(sd_latents)
    _, cond = ds.batch(torch.arange(N))
    assert isinstance(cond, Cond) and cond.labels.dtype == torch.long and not cond.labels.any()  # captioned: zeros
    text = cond.extra["text"]
    assert text.dtype == torch.float32 and text.shape == (N, tiny_diffusers.MAX_TOKENS, tiny_diffusers.TEXT_WIDTH)
    torch.testing.assert_close(text, embed(data["captions"]), rtol=2e-3, atol=2e-3)  # stored as float16
    torch.testing.assert_close(ds.null_text(), embed([""])[0], rtol=2e-3, atol=2e-3)
    assert ds.manifest["text"] == {"length": 77, "width": tiny_diffusers.TEXT_WIDTH, "dtype": "float16"}


def test_a_posterior_sample_is_seeded_per_sample_and_independent_of_the_batch(models, data, tmp_path):
    runs = {}
    for name, batch, seed in (("b3", 3, 5), ("b7", 7, 5), ("other", 3, 6)):
        _encode(models["cc"], data["folder"], tmp_path / name, posterior="sample", seed=seed, batch=batch)
        runs[name] = LatentArrays(tmp_path / name).batch(np.arange(N))[0]
    torch.testing.assert_close(runs["b3"], runs["b7"], rtol=1e-5, atol=1e-5)
    vae = _vae(models["cc"])
    x = torch.from_numpy(np.stack([prepare(b, R) for b in data["images"]]))
    with torch.no_grad():
        dist = vae.encode(x).latent_dist
    eps = torch.stack([posterior_noise(5, i, (4, 8, 8)) for i in range(N)])  # ε_i of sample i alone
    expected = (dist.mean + dist.std * eps) * vae.config.scaling_factor
    torch.testing.assert_close(runs["b3"], expected.double(), rtol=1e-5, atol=1e-5)
    assert (runs["b3"] - dist.mean * vae.config.scaling_factor).abs().mean() > 0.05
    assert (runs["b3"] - runs["other"]).abs().mean() > 0.05  # another seed, other noise
    _encode(models["cc"], data["folder"], tmp_path / "again", posterior="sample", seed=5, batch=3)
    assert _files(tmp_path / "again") == _files(tmp_path / "b3")  # reproducible to the byte


def test_the_folder_and_the_shards_give_the_same_latents(models, data, sd_latents, tmp_path):
    _encode(models["sd"], str(data["shards"] / "{00000..00001}.tar"), tmp_path / "wds")
    folder, shards = _files(sd_latents), _files(tmp_path / "wds")
    assert set(folder) == set(shards)
    for name in folder:
        if name != store.MANIFEST:
            assert folder[name] == shards[name], name
    assert json.loads(shards[store.MANIFEST])["source"]["kind"] == "webdataset"
    assert open_source(data["shards"]).count == N  # a directory of shards too


def test_an_interrupted_encoding_resumes_to_the_same_bytes(models, data, sd_latents, tmp_path):
    class Interrupted(Exception):
        pass

    def stop_after_first(k):
        if k == 0:
            raise Interrupted

    out = tmp_path / "sd"
    with pytest.raises(Interrupted):
        _encode(models["sd"], data["folder"], out, on_shard=stop_after_first)
    assert store.complete_shards(out, json.loads((out / store.MANIFEST).read_text())) == 1
    assert not (out / store.shard_file("latents", 1)).exists()
    with pytest.raises(ConfigError, match="incomplete"):
        LatentArrays(out)
    (out / ".text_00001.npy.tmp4242").write_bytes(b"torn")  # as a kill in the middle of a write leaves it
    resumed = []
    _encode(models["sd"], data["folder"], out, on_shard=resumed.append)
    assert resumed == [1, 2]  # continued after the complete shard
    assert _files(out) == _files(sd_latents)
    _encode(models["sd"], data["folder"], out, on_shard=resumed.append)  # complete: nothing more to do
    assert resumed == [1, 2] and _files(out) == _files(sd_latents)


def test_the_data_set_returns_the_rows_of_any_indices(sd_latents):
    ds = latents(str(sd_latents))  # the gin factory
    every = {kind: np.concatenate([np.load(sd_latents / store.shard_file(kind, k)) for k in range(3)])
             for kind in ("latents", "labels", "text")}
    for idx in (torch.tensor([19, 0, 8, 8, 7, 15, 3, 16]), [5], np.arange(N)[::-1], torch.tensor([-1, 2])):
        z, cond = ds.batch(idx)
        rows = np.asarray(idx) % N
        np.testing.assert_array_equal(z.numpy(), every["latents"][rows].astype(np.float64))
        np.testing.assert_array_equal(cond.extra["text"].numpy(), every["text"][rows].astype(np.float32))
        assert cond.labels.shape == (len(rows),)
    assert isinstance(ds._shard("latents", 2), np.memmap) and len(ds._shard("latents", 2)) == N - 2 * SHARD
    grid = ds.grid_cond(3)
    torch.testing.assert_close(grid.extra["text"], ds.cond(torch.arange(3)).extra["text"])
    assert ds.batch(torch.tensor([], dtype=torch.long))[0].shape == (0, 4, 8, 8)
    with pytest.raises(IndexError):
        ds.batch(torch.tensor([N]))


def test_a_class_conditional_encoding_keeps_its_labels(models, data, tmp_path):
    _encode(models["cc"], data["shards"], tmp_path / "cc")
    ds = LatentArrays(tmp_path / "cc")
    z, cond = ds.batch(torch.arange(N))
    assert cond.labels.tolist() == data["labels"] and cond.extra == {} and ds.null_text() is None
    assert ds.num_classes == max(data["labels"]) + 1 and ds.manifest["conditioning"] == "class"
    assert ds.grid_cond(N + 2).labels.tolist() == data["labels"] + data["labels"][:2]
    with pytest.raises(ConfigError, match="--num-classes is 3"):
        _encode(models["cc"], data["folder"], tmp_path / "few", num_classes=3)


def _error(capsys, argv):
    """The command's exit status and its one line on stderr."""
    status = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    return status, err


def test_the_command_encodes_like_the_function(models, data, sd_latents, tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["--model", str(models["sd"]), "--source", str(data["folder"]), "--out", str(out), "--batch", "3",
                 "--shard-size", str(SHARD), "--device", "cpu"]) == 0
    assert _files(out) == _files(sd_latents)


def test_missing_images_are_named_and_nothing_is_written(models, data, tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    (src / "0000.png").write_bytes(data["images"][0])
    (src / "captions.jsonl").write_text("".join(json.dumps({"file": f"{i:04d}.png", "caption": "a"}) + "\n"
                                                for i in range(6)))
    status, err = _error(capsys, ["--model", models["sd"], "--source", src, "--out", tmp_path / "out"])
    assert status == 2 and "5 images missing" in err and "0001.png, 0002.png, 0003.png and 2 more" in err
    assert not (tmp_path / "out").exists()


def test_a_different_existing_encoding_is_refused(models, data, sd_latents, capsys):
    before = _files(sd_latents)
    status, err = _error(capsys, ["--model", models["sd"], "--source", data["folder"], "--out", sd_latents,
                                  "--batch", 3, "--shard-size", SHARD, "--device", "cpu", "--posterior", "sample"])
    assert status == 2 and "holds a different encoding (posterior" in err
    assert _files(sd_latents) == before


def test_a_model_folder_without_vae_is_refused(models, data, tmp_path, capsys):
    (tmp_path / "model" / "unet").mkdir(parents=True)
    status, err = _error(capsys, ["--model", tmp_path / "model", "--source", data["folder"], "--out", tmp_path / "o"])
    assert status == 2 and "has no vae/ folder" in err and not (tmp_path / "o").exists()


@pytest.mark.parametrize("case, message", [
    ("no_captions_file", "no captions.jsonl in"),
    ("empty", "holds no samples"),
    ("unreadable_shard", "cannot read shard"),
    ("missing_caption", "have no caption"),
    ("foreign_out", "holds files but no latents.json"),
])
def test_other_faults_are_one_line_before_anything_is_written(case, message, models, data, tmp_path, capsys):
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    if case == "empty":
        (src / "captions.jsonl").write_text("\n")
    elif case == "unreadable_shard":
        (src / "00000.tar").write_bytes(b"not a tar file" * 100)
    elif case == "missing_caption":
        (src / "0000.png").write_bytes(data["images"][0])
        (src / "captions.jsonl").write_text(json.dumps({"file": "0000.png"}) + "\n")
    elif case == "foreign_out":
        src = data["folder"]
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    status, err = _error(capsys, ["--model", models["sd"], "--source", src, "--out", out, "--device", "cpu"])
    assert status == 2 and message in err, err
    assert (not out.exists()) or [p.name for p in out.iterdir()] == ["notes.txt"]


def test_a_truncated_shard_is_refused(data, tmp_path):
    """A shard cut short (a failed copy) is unreadable: found by the scan, before any encoding."""
    whole = (data["shards"] / "00000.tar").read_bytes()
    (tmp_path / "00000.tar").write_bytes(whole[:len(whole) // 2 + 100])
    with pytest.raises((ConfigError,), match="cannot read shard"):
        open_source(tmp_path)
    assert tarfile.is_tarfile(data["shards"] / "00000.tar")
