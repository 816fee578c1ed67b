"""FID protocols by name (method-spec §8): which Inception, which resize, which 8-bit quantiser, what is reported.

``tract``  the official TRACT code (apple/ml-tract ``lib/eval/fid.py``): pytorch-fid's port of the TF Inception
           (``pt_inception-2015-12-05-6726825d.pth``) on images quantised to round(127.5·(x + 1)), mapped back to
           [−1, 1] and resized bilinearly to 299 inside the network (align_corners=False).  The paper tables' default.
``clean``  clean-fid's ``clean`` mode: NVIDIA's TorchScript TF-Inception on uint8 images resized by PIL bicubic to 299.
``edm``    NVlabs/edm ``fid.py``: the same NVIDIA TF-Inception port on uint8 images clip(⌊127.5·x + 128⌋), resized
           inside the network; the best of the seed ranges is the headline number, mean ± std beside it.

Every protocol takes one seed per sample, 50,000 samples per seed range, the Fréchet distance of float64
statistics with Σ unbiased, and writes its name into every result.  Nothing here imports torch.
"""
from dataclasses import dataclass

from tract_repro.common.errors import ConfigError


@dataclass(frozen=True)
class Protocol:
    name: str
    weights: str         # "pytorch_fid" (pt_inception-…pth, torch hub) or "torchscript" (inception-2015-12-05.pt)
    resize: str          # "network" (inside the feature network) or "pil_bicubic" (clean-fid's resizer, outside)
    quantiser: str       # "round" (round(127.5·(x + 1))) or "edm" (clip(⌊127.5·x + 128⌋, 0, 255))
    best_of_ranges: bool  # the headline is min over seed ranges (EDM), else their mean
    cleanfid_mode: str   # clean-fid's mode with this network and input path: its precomputed CIFAR-10 statistics
    description: str

    def quantise(self, x):
        """Samples in [−1, 1] (B, C, H, W) → uint8, as this protocol's reference code writes its images."""
        from tract_repro.sampling.images import to_uint8

        return to_uint8(x, self.quantiser)

    def headline(self, fids):
        """The number a table shows for per-range FIDs: the minimum (EDM's "best of three") or the mean."""
        return float(min(fids)) if self.best_of_ranges else float(sum(fids) / len(fids))

    def record(self):
        """What a result says about how it was measured."""
        return dict(name=self.name, inception=self.weights, resize=self.resize, quantiser=self.quantiser,
                    headline="min over seed ranges" if self.best_of_ranges else "mean over seed ranges",
                    description=self.description)


PROTOCOLS = {
    "tract": Protocol("tract", "pytorch_fid", "network", "round", False, "legacy_pytorch",
                      "official TRACT code: pytorch-fid Inception, bilinear resize to 299 in the network, round(127.5·(x + 1))"),
    "clean": Protocol("clean", "torchscript", "pil_bicubic", "round", False, "clean",
                      "clean-fid clean: TorchScript TF-Inception, PIL bicubic resize to 299"),
    "edm": Protocol("edm", "torchscript", "network", "edm", True, "legacy_tensorflow",
                    "NVlabs/edm fid.py: TF-Inception resizing inside, ⌊127.5·x + 128⌋, best of the seed ranges"),
}
DEFAULT = "tract"

#: clean-fid modes written by earlier versions into reference statistics and results, by the protocol with that path
LEGACY_MODES = {"legacy_pytorch": "tract", "clean": "clean", "legacy_tensorflow": "edm"}


def get(name):
    """The protocol called ``name``; one line naming the choices otherwise."""
    if name not in PROTOCOLS:
        raise ConfigError(f"FID protocol {name!r}: choose one of {', '.join(PROTOCOLS)} (paper.fid.protocol, --protocol)")
    return PROTOCOLS[name]


def of_metadata(meta):
    """The protocol a reference-statistics or result record was made with (``protocol``, or an older ``mode``)."""
    name = meta.get("protocol")
    if isinstance(name, dict):
        name = name.get("name")
    if name is None and meta.get("mode") in LEGACY_MODES:
        name = LEGACY_MODES[meta["mode"]]
    return get(name) if name is not None else None
