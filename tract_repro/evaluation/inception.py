"""The Inception feature extractor of each FID protocol, from local weights only (method-spec §8).

``tract``: pytorch-fid's Inception as the official TRACT code calls it (input in [−1, 1], bilinear resize to 299
inside, no further normalisation).  ``clean`` and ``edm``: clean-fid's wrapper of NVIDIA's TorchScript TF-Inception
(``inception-2015-12-05.pt``, the network of EDM's ``fid.py``), resizing inside the network for ``edm``.  Nothing is
downloaded: a missing file stops with one line naming it and where to fetch it.
"""
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import gin
import numpy as np
import torch
import torch.nn.functional as F

from tract_repro.common.errors import ConfigError
from tract_repro.evaluation import protocols
from tract_repro.evaluation.sources import PYTORCH_FID_URL, TORCHSCRIPT_URL, inception_file


class MissingWeights(ConfigError):
    """Inception weights are not on disk."""


@gin.configurable
def inception_extractor(protocol="tract", path=None, device="cpu"):
    """The protocol's feature network: a float batch (B, 3, H, W) in [0, 255] → (B, 2048) pool features.

    The ``clean`` protocol expects its batch already resized to 299 (see :class:`ImageFeatures`); the others resize
    inside.  Each also carries ``probabilities`` (its class head on the same features, for the Inception Score).
    """
    spec = protocols.get(protocol)
    device = torch.device(device)
    weights = inception_file(protocol, path)
    if not weights.is_file():
        url = TORCHSCRIPT_URL if spec.weights == "torchscript" else PYTORCH_FID_URL
        raise MissingWeights(f"Inception weights {weights} (FID protocol {protocol}) not found (offline): fetch {url} "
                             f"and put it there, or point --inception (paper.inception) at its folder")
    if spec.weights == "pytorch_fid":
        return pytorch_fid_extractor(weights, device)
    from cleanfid.inception_torchscript import InceptionV3W

    model = InceptionV3W(str(weights.parent), download=False, resize_inside=spec.resize == "network").to(device).eval()

    def extract(x):
        return model(x.to(device))
    head = getattr(model.base, "output", None)  # the 1008-class layer on the same 2048 pool features
    if head is not None:
        extract.probabilities = class_probabilities(head.weight.detach().double().cpu().numpy())
    return extract


def class_probabilities(weight):
    """features (N, 2048) → softmax(features · Wᵀ) over the Inception classes, without the output bias (as StyleGAN's
    and the original TF Inception Score compute it)."""
    def probabilities(features):
        logits = np.asarray(features, dtype=np.float64) @ weight.T
        logits -= logits.max(1, keepdims=True)
        e = np.exp(logits)
        return e / e.sum(1, keepdims=True)
    return probabilities


def pytorch_fid_network(weights):
    """pytorch-fid's FID Inception (pool3 block) with its weights read from a local file (weights_only), taking
    299² input in [−1, 1] (no resize, no normalisation inside: clean-fid's copy of it resizes nowhere).
    ``weights`` is the file or its already loaded state dict."""
    from cleanfid import inception_pytorch

    state = weights if isinstance(weights, dict) else torch.load(weights, map_location="cpu", weights_only=True)
    original = inception_pytorch.load_state_dict_from_url
    inception_pytorch.load_state_dict_from_url = lambda *a, **k: state
    try:
        return inception_pytorch.InceptionV3(output_blocks=[3], resize_input=False, normalize_input=False).eval()
    finally:
        inception_pytorch.load_state_dict_from_url = original


def pytorch_fid_extractor(weights, device):
    """[0, 255] floats → x/127.5 − 1 → bilinear to 299 (align_corners=False) → pytorch-fid's Inception → (B, 2048):
    the official code's InceptionV3(resize_input=True, normalize_input=False) on its [−1, 1] samples.  The file's
    1008-class layer (``fc``, on the same pool features) gives the Inception Score's probabilities."""
    state = torch.load(Path(weights), map_location="cpu", weights_only=True)
    model = pytorch_fid_network(state).to(device)

    def extract(x):
        with torch.no_grad():
            x = F.interpolate(x.to(device) / 127.5 - 1, size=(299, 299), mode="bilinear", align_corners=False)
            return model(x)[0].flatten(1)
    if "fc.weight" in state:
        extract.probabilities = class_probabilities(state["fc.weight"].double().numpy())
    return extract


class ImageFeatures:
    """clean-fid's feature path for in-memory uint8 images: the protocol's resize, then the extractor.

    ``extractor`` (e.g. :func:`tract_repro.evaluation.inception.inception_extractor`'s result) maps a float
    batch (B, 3, H, W) in [0, 255] to (B, D) features.  It is built by the caller once and reused here for
    every batch.  ``resize`` replaces the protocol's resize outside the network (tests pass the identity).
    """

    def __init__(self, extractor, protocol="tract", device="cpu", resize=None, workers=8):
        from cleanfid.resize import build_resizer

        self.protocol = protocols.get(protocol).name
        self.extractor, self.device = extractor, torch.device(device)
        self.inside = resize is None and protocols.get(protocol).resize == "network"  # the network resizes inside
        self.resize = resize if resize is not None else None if self.inside else build_resizer("clean")
        self.pool = ThreadPoolExecutor(workers) if workers > 1 else None  # PIL releases the GIL while resizing

    def __call__(self, images):
        """(B, C, H, W) uint8 → (B, D) float features, as clean-fid's generator path computes them."""
        from cleanfid.fid import get_batch_features

        if images.dtype != torch.uint8:
            raise ConfigError(f"ImageFeatures takes uint8 images, got {images.dtype}: quantise first")
        if self.inside:
            batch = images.float()
        else:
            arrays = list(images.permute(0, 2, 3, 1).numpy())
            resized = list(self.pool.map(self.resize, arrays)) if self.pool else [self.resize(a) for a in arrays]
            batch = torch.from_numpy(np.stack(resized).transpose(0, 3, 1, 2).astype(np.float32))
        return get_batch_features(batch, self.extractor, self.device)
