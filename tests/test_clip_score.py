"""The CLIP score (100·max(cos(E_I(x), E_T(c)), 0), mean over pairs) on the tiny real CLIP folder of
tests/tiny_diffusers.py: against a direct computation through the folder's processor and CLIPModel, batch-size
independence, the clamp of negative cosines, the record of the model used, and each one-line refusal."""
import json
import shutil
import types

import pytest
import torch

pytest.importorskip("transformers", reason="transformers is in the 'latent' extra: pip install 'tract-repro[latent]'")

from tests import tiny_diffusers  # noqa: E402
from tract_repro.common.errors import ConfigError, one_line  # noqa: E402
from tract_repro.common.files import sha256  # noqa: E402
from tract_repro.evaluation.clip_score import ClipScorer, clip_score  # noqa: E402

N = 7
CAPTIONS = ["the cat", "a dog on the mat", "digits", "the giant thing", "a", "cats and dogs and digits", "the the the"]


def _images(n=N, seed=0):
    """n random images in [−1, 1], 20 × 24 (the processor resizes and crops them to 16 × 16)."""
    return torch.rand(n, 3, 24, 20, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Seed 7: its cosines on these images and captions have both signs (−0.47 … 0.38), so the clamp matters."""
    return tiny_diffusers.clip_folder(tmp_path_factory.mktemp("clip") / "tiny-clip", seed=7)


@pytest.fixture(scope="module")
def scorer(folder):
    return ClipScorer(folder)


def _direct(folder, images, captions, backend):
    """The definition, step by step: 8-bit images → the folder's processor → get_image_features; tokenizer (padded
    to the longest, as torchmetrics does) → get_text_features; cosine; 100·max(cos, 0); mean."""
    from transformers import CLIPImageProcessor, CLIPImageProcessorPil, CLIPModel, CLIPTokenizer

    model = CLIPModel.from_pretrained(folder, use_safetensors=True).eval()
    processor = (CLIPImageProcessorPil if backend == "pil" else CLIPImageProcessor).from_pretrained(folder)
    tokenizer = CLIPTokenizer.from_pretrained(folder)
    uint8 = torch.round(127.5 * (images.double() + 1)).clamp(0, 255).to(torch.uint8)
    with torch.no_grad():
        a = model.get_image_features(**processor(images=list(uint8), return_tensors="pt")).pooler_output
        b = model.get_text_features(**tokenizer(captions, padding=True, truncation=True, return_tensors="pt")).pooler_output
    cos = (a / a.norm(dim=-1, keepdim=True) * (b / b.norm(dim=-1, keepdim=True))).sum(-1).double()
    return cos, float((100 * torch.maximum(cos, torch.zeros_like(cos))).mean())


@pytest.mark.parametrize("backend", ["pil", "torchvision"])
def test_the_clip_score_is_the_mean_of_100_max_cos_0_through_the_folders_processor_and_model(folder, backend):
    images = _images()
    cos, expected = _direct(folder, images, CAPTIONS, backend)
    assert (cos < 0).any() and (cos > 0).any()  # a case where clamping each pair differs from clamping the mean
    scorer = ClipScorer(folder, backend=backend)
    assert type(scorer.processor).__name__ == ("CLIPImageProcessorPil" if backend == "pil" else "CLIPImageProcessor")
    assert torch.allclose(scorer.cosines(images, CAPTIONS, batch=3), cos, atol=1e-5)
    result = clip_score(images, CAPTIONS, folder, batch=3, backend=backend)
    assert result["clip_score"] == pytest.approx(expected, abs=1e-3)
    assert result["pairs"] == N and result["negative_pairs"] == int((cos < 0).sum())
    assert result["cosine_mean"] == pytest.approx(float(cos.mean()), abs=1e-5)


def test_the_score_does_not_depend_on_the_batch_size(scorer):
    images = _images(seed=1)
    cosines = [scorer.cosines(images, CAPTIONS, batch=b) for b in (1, 2, 5, 64)]
    for c in cosines[1:]:
        assert torch.allclose(c, cosines[0], atol=1e-6)


def test_a_negative_cosine_contributes_zero_not_its_value(scorer, monkeypatch):
    """Text features ±3·E_I(x_i) make the cosines exactly +1, −1, +1, …: the scores are 100, 0, 100, … (not −100)."""
    images, signs = _images(5, seed=2), torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0])
    targets = iter((3 * signs[:, None] * scorer.image_features(images)).split(2))
    monkeypatch.setattr(scorer.model, "get_text_features",
                        lambda input_ids, attention_mask: types.SimpleNamespace(pooler_output=next(targets)))
    result = scorer(images, CAPTIONS[:5], batch=2)
    assert result["clip_score"] == pytest.approx(60.0, abs=1e-4)       # (100 + 0 + 100 + 0 + 100) / 5
    assert result["cosine_mean"] == pytest.approx(0.2, abs=1e-6)       # the clamp is per pair, before the mean
    assert result["negative_pairs"] == 2


def test_the_result_records_the_clip_model_and_the_convention(folder, scorer, tmp_path):
    result = scorer(_images(3), CAPTIONS[:3])
    model = result["model"]
    assert model["folder"] == "tiny-clip" and model["config_sha256"] == sha256(folder / "config.json")
    assert model["weights_format"] == "safetensors"
    assert model["weights_sha256"] == {"model.safetensors": sha256(folder / "model.safetensors")}
    assert model["image_processor"] == "CLIPImageProcessorPil" and model["context_length"] == tiny_diffusers.MAX_TOKENS
    assert result["convention"].startswith("100*max(cos(E_I(image), E_T(caption)), 0), mean over pairs")
    assert json.loads(json.dumps(result)) == result
    other = ClipScorer(tiny_diffusers.clip_folder(tmp_path / "tiny-clip", seed=8)).record  # same config, other weights
    assert other["config_sha256"] == model["config_sha256"] and other["weights_sha256"] != model["weights_sha256"]


def test_a_caption_longer_than_the_context_is_truncated_and_counted(scorer):
    long = " ".join(["cat"] * 100)
    result = scorer(_images(2), ["the cat", long])
    assert result["truncated_captions"] == 1 and result["pairs"] == 2


def test_plain_pickled_weights_load_when_torch_load_weights_only_accepts_them(folder, scorer, tmp_path):
    copy = shutil.copytree(folder, tmp_path / "bin-clip", ignore=shutil.ignore_patterns("*.safetensors"))
    torch.save(scorer.model.state_dict(), copy / "pytorch_model.bin")
    images = _images(4, seed=3)
    bin_scorer = ClipScorer(copy)
    assert bin_scorer.record["weights_format"] == "bin"
    assert torch.allclose(bin_scorer.cosines(images, CAPTIONS[:4]), scorer.cosines(images, CAPTIONS[:4]), atol=1e-6)


class CodeInPickle:
    """An object torch.load(weights_only=True) refuses: unpickling it names a class, i.e. could run code."""


@pytest.fixture
def no_loading(monkeypatch):
    """Fail loudly if a CLIP model starts loading: each refusal comes before any work."""
    from transformers import CLIPModel

    def load(*args, **kwargs):
        raise AssertionError("a CLIP model was loaded before the inputs and folder were checked")
    monkeypatch.setattr(CLIPModel, "from_pretrained", load)


def _without_weights(folder, path):
    return shutil.copytree(folder, path, ignore=shutil.ignore_patterns("*.safetensors"))


def _code_pickle(folder, path):
    copy = _without_weights(folder, path)
    torch.save({"weights": CodeInPickle()}, copy / "pytorch_model.bin")
    return copy


def _without_processor(folder, path):
    return shutil.copytree(folder, path, ignore=shutil.ignore_patterns("preprocessor_config.json"))


@pytest.mark.parametrize("make, says", [
    (lambda folder, path: path / "absent", ["not found", "openai/clip-vit-large-patch14", "Hugging Face hub",
                                            "huggingface-cli download", "save_pretrained", "clip=DIR"]),
    (lambda folder, path: None, ["not found", "openai/clip-vit-large-patch14"]),
    (_without_weights, ["no model.safetensors", "openai/clip-vit-large-patch14"]),
    (_code_pickle, ["pickled weights pytorch_model.bin", "weights_only=True", "safetensors"]),
    (_without_processor, ["no preprocessor_config.json", "save_pretrained"]),
], ids=["missing folder", "no folder given", "no safetensors", "pickle with code", "no processor"])
def test_an_unusable_clip_folder_stops_in_one_line_naming_the_fix(folder, tmp_path, no_loading, make, says):
    with pytest.raises(ConfigError) as err:
        clip_score(_images(2), CAPTIONS[:2], make(folder, tmp_path / "broken"))
    message = str(err.value)
    assert one_line(err.value) == message and all(s in message for s in says), message


@pytest.mark.parametrize("images, captions, says", [
    (_images(3), CAPTIONS[:2], "3 images but 2 captions"),
    (_images(2), CAPTIONS[:3], "2 images but 3 captions"),
    (torch.zeros(2, 3, 16, 16, dtype=torch.uint8), CAPTIONS[:2], "float images in [-1, 1]"),
    (_images(2), "the cat", "a list of caption strings"),
], ids=["more images", "more captions", "uint8 images", "one string"])
def test_images_and_captions_that_do_not_pair_up_stop_in_one_line(folder, no_loading, images, captions, says):
    with pytest.raises(ConfigError) as err:
        clip_score(images, captions, folder)
    assert one_line(err.value) == str(err.value) and says in str(err.value)


def test_truncated_weights_stop_in_one_line(folder, tmp_path):
    copy = shutil.copytree(folder, tmp_path / "truncated")
    (copy / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes()[:1000])
    with pytest.raises(ConfigError) as err:
        ClipScorer(copy)
    assert one_line(err.value) == str(err.value) and "cannot load" in str(err.value) and "download it again" in str(err.value)


def test_an_unknown_image_processor_backend_stops_in_one_line(folder, no_loading):
    with pytest.raises(ConfigError, match="backend 'cv2': choose one of pil, torchvision"):
        clip_score(_images(2), CAPTIONS[:2], folder, backend="cv2")
