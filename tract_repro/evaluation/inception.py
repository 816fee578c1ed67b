"""The Inception feature extractor for FID, through clean-fid, failing fast when offline (method-spec §8).

clean-fid's modes: ``clean`` and ``legacy_tensorflow`` use the TorchScript port of the TF
Inception (``inception-2015-12-05.pt``); ``legacy_pytorch`` uses pytorch-fid's weights,
closest to the official TRACT code.  We never let clean-fid download: the weights must be
where clean-fid keeps them (or at a path bound in gin), or we stop with one line.
"""
from pathlib import Path

import gin
import numpy as np
import torch

from tract_repro.common.errors import ConfigError
from tract_repro.evaluation.sources import (  # noqa: F401  (re-exported names)
    PYTORCH_FID_NAME, PYTORCH_FID_URL, TORCHSCRIPT_NAME, TORCHSCRIPT_URL, default_torchscript_dir,
)


class MissingWeights(ConfigError):
    """Inception weights are not on disk."""


@gin.configurable
def inception_extractor(mode="clean", path=None, device="cpu"):
    """clean-fid's feature extractor for ``mode``, built from local weights only; [0, 255] NCHW → (N, 2048)."""
    from cleanfid.inception_torchscript import InceptionV3W

    device = torch.device(device)
    if mode in ("clean", "legacy_tensorflow"):
        folder = Path(path).parent if path and Path(path).suffix == ".pt" else Path(path or default_torchscript_dir())
        weights = folder / TORCHSCRIPT_NAME
        if not weights.is_file():
            raise MissingWeights(f"Inception weights {weights} not found (offline): fetch {TORCHSCRIPT_URL} and put it "
                                 f"there, or set inception_extractor.path")
        model = InceptionV3W(str(folder), download=False, resize_inside=(mode == "legacy_tensorflow")).to(device).eval()

        def extract(x):
            return model(x.to(device))
        head = getattr(model.base, "output", None)  # the 1008-class layer on the same 2048 pool features
        if head is not None:
            extract.probabilities = class_probabilities(head.weight.detach().double().cpu().numpy())
        return extract
    if mode == "legacy_pytorch":
        hub = Path(torch.hub.get_dir()) / "checkpoints" / PYTORCH_FID_NAME
        weights = Path(path) if path else hub
        if not weights.is_file():
            raise MissingWeights(f"pytorch-fid Inception weights {weights} not found (offline): fetch {PYTORCH_FID_URL} "
                                 f"and put it at {hub}, or set inception_extractor.path")
        return _pytorch_fid_extractor(weights, device)
    raise ConfigError(f"inception_extractor.mode = {mode!r}: choose 'clean', 'legacy_tensorflow' or 'legacy_pytorch'")


def class_probabilities(weight):
    """features (N, 2048) → softmax(features · Wᵀ) over the Inception classes, without the output bias (as StyleGAN's
    and the original TF Inception Score compute it).  pytorch-fid's weights have no class head: no IS there."""
    def probabilities(features):
        logits = np.asarray(features, dtype=np.float64) @ weight.T
        logits -= logits.max(1, keepdims=True)
        e = np.exp(logits)
        return e / e.sum(1, keepdims=True)
    return probabilities


def _pytorch_fid_extractor(weights, device):
    """clean-fid's pytorch-fid Inception with weights loaded from a local file (weights_only)."""
    from cleanfid import inception_pytorch

    original = inception_pytorch.load_state_dict_from_url
    inception_pytorch.load_state_dict_from_url = lambda *a, **k: torch.load(weights, map_location="cpu", weights_only=True)
    try:
        model = inception_pytorch.InceptionV3(output_blocks=[3], resize_input=False).to(device).eval()
    finally:
        inception_pytorch.load_state_dict_from_url = original
    return lambda x: model(x.to(device) / 255)[0].squeeze(-1).squeeze(-1)

