"""Where the FID protocol's external files live and how to fetch them, without importing torch.

Nothing here downloads.  The checks of the paper-scale pipeline use these to fail in one line
within a second; :mod:`tract_repro.evaluation.inception` and :mod:`tract_repro.evaluation.fid`
use the same names and places.
"""
import importlib.util
import os
import platform
from pathlib import Path

from tract_repro.common.errors import ConfigError


TORCHSCRIPT_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
TORCHSCRIPT_NAME = "inception-2015-12-05.pt"
PYTORCH_FID_NAME = "pt_inception-2015-12-05-6726825d.pth"
PYTORCH_FID_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{PYTORCH_FID_NAME}"
CLEANFID_STATS_URL = "https://www.cs.cmu.edu/~clean-fid/stats"


def default_torchscript_dir():
    """Where clean-fid looks for (and would download) the TorchScript Inception."""
    return Path("./") if platform.system() == "Windows" else Path("/tmp")


def torch_hub_checkpoints():
    """torch.hub's checkpoint folder, as torch.hub.get_dir() computes it (TORCH_HOME, else XDG cache)."""
    home = os.environ.get("TORCH_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "torch")
    return Path(os.path.expanduser(home)) / "hub" / "checkpoints"


def inception_file(mode="clean", path=None):
    """The weights file the Inception extractor of clean-fid ``mode`` reads, given an optional file or folder."""
    if mode == "legacy_pytorch":
        return Path(path) if path else torch_hub_checkpoints() / PYTORCH_FID_NAME
    folder = Path(path).parent if path and Path(path).suffix == ".pt" else Path(path or default_torchscript_dir())
    return folder / TORCHSCRIPT_NAME


def missing_inception(mode="clean", path=None):
    """None, or one line: which Inception weights file is missing, in which folder, and where to fetch it."""
    weights = inception_file(mode, path)
    if weights.is_file():
        return None
    url = PYTORCH_FID_URL if mode == "legacy_pytorch" else TORCHSCRIPT_URL
    return f"Inception weights {weights.name} not found in {weights.parent}/ (offline): fetch {url} and put it there"


def cleanfid_stats_folder():
    """clean-fid's stats folder (<site-packages>/cleanfid/stats), found without importing clean-fid."""
    spec = importlib.util.find_spec("cleanfid")
    if spec is None or not spec.origin:
        raise ConfigError("clean-fid is not installed: pip install clean-fid")
    return Path(spec.origin).parent / "stats"


def cleanfid_stats_name(dataset="cifar10", mode="clean", split="train", res=32):
    """The file name clean-fid gives its precomputed statistics."""
    return f"{dataset}_{mode}_{split}_{res}.npz".lower()


def missing_cleanfid_stats(mode="clean"):
    """None, or one line: clean-fid's CIFAR-10 training-set statistics for ``mode``, where to fetch and put them."""
    name, folder = cleanfid_stats_name(mode=mode), cleanfid_stats_folder()
    if (folder / name).is_file():
        return None
    return (f"clean-fid's CIFAR-10 training-set statistics {name} not found (offline): fetch {CLEANFID_STATS_URL}/{name} "
            f"and put it in {folder}/")
