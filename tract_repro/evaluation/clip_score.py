"""CLIP score of text-to-image samples (Hessel et al. 2021), from a CLIP model in a local folder only.

score(x, c) = 100·max(cos(E_I(x), E_T(c)), 0) per pair, and the CLIP score is its mean over pairs (Hessel et al.'s
CLIP-S with w = 100, the scale distillation papers and torchmetrics report).  E_I, E_T are a ``transformers``
``CLIPModel``'s projected image and text embeddings; images are quantised to 8 bits as the sample dumps are
(round(127.5·(x + 1))) and then preprocessed by the folder's own image processor (its resize, crop and
normalisation); captions are tokenised by its own tokenizer, truncated to its context length.  Scores of different
CLIP models are not comparable, so every result records the model (folder name, config and weights sha256).
Nothing is downloaded: a missing or unsafe folder stops with one line naming the fix, before any work.
"""
import json
from pathlib import Path

import torch

from tract_repro.common.errors import ConfigError
from tract_repro.common.files import sha256

#: the CLIP most text-to-image distillation papers score with
DEFAULT_MODEL = "openai/clip-vit-large-patch14"
CONVENTION = ("100*max(cos(E_I(image), E_T(caption)), 0), mean over pairs "
              "(Hessel et al. 2021 CLIP-S with w = 100)")
BACKENDS = ("pil", "torchvision")
FETCH = (f"fetch {DEFAULT_MODEL} (or the CLIP you compare with) from the Hugging Face hub with "
         f"`huggingface-cli download {DEFAULT_MODEL} --local-dir DIR` (or CLIPModel and CLIPProcessor "
         f".from_pretrained(...).save_pretrained(DIR)) and point the clip folder option (clip_score(..., clip=DIR)) at DIR")


def check_inputs(images, captions, batch=1):
    """(N, 3, H, W) floats, N str captions and a positive batch, else one line saying what is wrong."""
    if not torch.is_tensor(images) or not images.is_floating_point() or images.dim() != 4 or images.shape[1] != 3:
        got = f"{images.dtype} {tuple(images.shape)}" if torch.is_tensor(images) else type(images).__name__
        raise ConfigError(f"CLIP score takes float images in [-1, 1] shaped (N, 3, H, W), got {got}")
    if isinstance(captions, str) or not all(isinstance(c, str) for c in captions):
        raise ConfigError("CLIP score takes a list of caption strings, one per image")
    if len(captions) != len(images):
        raise ConfigError(f"CLIP score needs one caption per image: {len(images)} images but {len(captions)} captions")
    if not len(images):
        raise ConfigError("CLIP score of no images: pass at least one image and caption")
    if not isinstance(batch, int) or batch < 1:
        raise ConfigError(f"CLIP score batch {batch}: pass a positive number of pairs per network call")


def check_backend(backend):
    if backend not in BACKENDS:
        raise ConfigError(f"CLIP image processor backend {backend!r}: choose one of {', '.join(BACKENDS)}")


def _bin_is_plain(path):
    """Whether a pickled weights file loads without running code (torch.load with weights_only)."""
    try:
        torch.load(path, map_location="cpu", weights_only=True)
        return True
    except Exception:  # an UnpicklingError for a global it may not load, or a file that is not a checkpoint
        return False


def weight_files(folder):
    """(format, files) of a CLIP folder's weights: safetensors, else plain (weights_only) pickles; else one line."""
    for fmt, single, index in (("safetensors", "model.safetensors", "model.safetensors.index.json"),
                               ("bin", "pytorch_model.bin", "pytorch_model.bin.index.json")):
        if (folder / index).is_file():
            files = [folder / f for f in sorted(set(json.loads((folder / index).read_text())["weight_map"].values()))]
        elif (folder / single).is_file():
            files = [folder / single]
        else:
            continue
        lost = [f.name for f in files if not f.is_file()]
        if lost:
            raise ConfigError(f"CLIP folder {folder} lacks the weight shard(s) {', '.join(lost)}: download them again")
        unsafe = [f.name for f in files if fmt == "bin" and not _bin_is_plain(f)]
        if unsafe:
            raise ConfigError(f"CLIP folder {folder} has only pickled weights {unsafe[0]} that "
                              f"torch.load(weights_only=True) refuses (they could run code): download its "
                              f"model.safetensors, or re-save a trusted copy with save_pretrained(DIR, safe_serialization=True)")
        return fmt, files
    raise ConfigError(f"CLIP folder {folder} has no model.safetensors weights: {FETCH}")


def check_folder(clip):
    """The folder of a CLIP model (config.json with model_type clip, processor, tokenizer, weights), else one line."""
    if clip is None or not Path(clip).is_dir():
        raise ConfigError(f"CLIP model folder {clip} not found (offline): {FETCH}")
    folder = Path(clip)
    if not (folder / "config.json").is_file():
        raise ConfigError(f"{folder} has no config.json, so it is not a transformers CLIP folder: {FETCH}")
    kind = json.loads((folder / "config.json").read_text()).get("model_type")
    if kind != "clip":
        raise ConfigError(f"{folder} holds a {kind!r} model, not a CLIPModel (model_type 'clip'): {FETCH}")
    if not (folder / "preprocessor_config.json").is_file():
        raise ConfigError(f"{folder} has no preprocessor_config.json (the CLIP image processor): save the processor "
                          f"there too (CLIPProcessor.from_pretrained(...).save_pretrained(DIR)) or download the whole "
                          f"repository")
    if not ((folder / "tokenizer.json").is_file() or (folder / "vocab.json").is_file()):
        raise ConfigError(f"{folder} has no tokenizer (tokenizer.json or vocab.json): save the processor there too "
                          f"(CLIPProcessor.from_pretrained(...).save_pretrained(DIR)) or download the whole repository")
    return folder


class ClipScorer:
    """A local CLIP model with its processor, loaded once: ``scorer(images, captions)`` → the CLIP score's record.

    ``backend``: the image processor's backend, ``"pil"`` (PIL bicubic resize, as OpenAI's CLIP preprocesses and
    transformers 4's default ``CLIPProcessor`` did) or ``"torchvision"``; both read resize, crop and normalisation from
    the folder's ``preprocessor_config.json``.
    """

    def __init__(self, clip, device="cpu", backend="pil"):
        from safetensors import SafetensorError
        from transformers import AutoImageProcessor, CLIPModel, CLIPTokenizer

        check_backend(backend)
        self.folder = check_folder(clip)
        fmt, files = weight_files(self.folder)
        self.device = torch.device(device)
        try:
            self.model = CLIPModel.from_pretrained(self.folder, use_safetensors=fmt == "safetensors")
            self.tokenizer = CLIPTokenizer.from_pretrained(self.folder)
            self.processor = AutoImageProcessor.from_pretrained(self.folder, backend=backend)
        except (OSError, ValueError, SafetensorError) as exc:  # e.g. a truncated download
            raise ConfigError(f"cannot load {self.folder} as a CLIP model ({' '.join(str(exc).split())[:300]}): "
                              f"download it again") from None
        self.model = self.model.to(self.device, torch.float32).eval()
        self.context = min(self.tokenizer.model_max_length, self.model.config.text_config.max_position_embeddings)
        config = json.loads((self.folder / "config.json").read_text())
        self.record = dict(folder=self.folder.name, name_or_path=config.get("_name_or_path") or None,
                           config_sha256=sha256(self.folder / "config.json"), weights_format=fmt,
                           weights_sha256={f.name: sha256(f) for f in files},
                           image_processor=type(self.processor).__name__, context_length=self.context,
                           images="uint8 round(127.5*(x + 1)), then the processor's resize, crop and normalisation")

    @torch.no_grad()
    def image_features(self, images):
        """[−1, 1] floats (B, 3, H, W) → round(127.5·(x + 1)) uint8 → the processor → E_I (B, D)."""
        from tract_repro.sampling.images import to_uint8

        pixels = self.processor(images=list(to_uint8(images.detach().cpu())), return_tensors="pt").pixel_values
        return self.model.get_image_features(pixel_values=pixels.to(self.device)).pooler_output

    @torch.no_grad()
    def text_features(self, captions):
        """Captions → tokens (padded and truncated to the context length) → E_T (B, D)."""
        tokens = self.tokenizer(list(captions), padding="max_length", truncation=True, max_length=self.context,
                                return_tensors="pt").to(self.device)
        features = self.model.get_text_features(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask)
        return features.pooler_output

    def cosines(self, images, captions, batch=64, progress=True):
        """cos(E_I(x_i), E_T(c_i)) for each pair (N,), float64 on the CPU, ``batch`` pairs per network call."""
        from tqdm import tqdm

        check_inputs(images, captions, batch)
        out = []
        for i in tqdm(range(0, len(images), batch), desc="CLIP score", unit="batch", leave=False,
                      disable=None if progress else True):
            a = self.image_features(images[i:i + batch]).double()
            b = self.text_features(captions[i:i + batch]).double()
            out.append(torch.nn.functional.cosine_similarity(a, b, dim=-1).cpu())
        return torch.cat(out)

    def truncated(self, captions):
        """How many captions are longer than the context length (their tail is not scored)."""
        return sum(len(ids) > self.context for ids in self.tokenizer(list(captions), verbose=False).input_ids)

    def __call__(self, images, captions, batch=64, progress=True):
        """{clip_score: mean of 100·max(cos, 0), per-pair counts, the convention and the CLIP model used}."""
        cos = self.cosines(images, captions, batch, progress)
        return dict(clip_score=float((100 * cos.clamp(min=0)).mean()), pairs=len(cos),
                    negative_pairs=int((cos < 0).sum()), cosine_mean=float(cos.mean()),
                    truncated_captions=self.truncated(captions), convention=CONVENTION, model=self.record)


def clip_score(images, captions, clip, batch=64, device="cpu", backend="pil", progress=True):
    """The CLIP score record of ``images`` ((N, 3, H, W) in [−1, 1]) and ``captions`` (N str), CLIP from ``clip``."""
    check_inputs(images, captions, batch)
    check_backend(backend)
    return ClipScorer(clip, device, backend)(images, captions, batch, progress)
