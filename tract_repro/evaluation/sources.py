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
from tract_repro.evaluation import protocols


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


def inception_file(protocol="tract", path=None):
    """The Inception weights file FID ``protocol`` reads, given an optional file or folder (``paper.inception``).

    ``tract`` reads pytorch-fid's ``.pth`` (default: torch.hub's checkpoints), ``clean`` and ``edm`` the TorchScript
    ``.pt`` (default: where clean-fid keeps it).  A folder holds either by its usual name; a file of the other kind
    points at its folder.
    """
    torchscript = protocols.get(protocol).weights == "torchscript"
    name = TORCHSCRIPT_NAME if torchscript else PYTORCH_FID_NAME
    if path is None:
        return default_torchscript_dir() / name if torchscript else torch_hub_checkpoints() / name
    path = Path(path)
    if path.suffix in (".pt", ".pth"):
        return path if (path.suffix == ".pt") == torchscript else path.parent / name
    return path / name


def missing_inception(protocol="tract", path=None):
    """None, or one line: which Inception weights file the protocol misses, in which folder, and where to fetch it."""
    weights = inception_file(protocol, path)
    if weights.is_file():
        return None
    url = TORCHSCRIPT_URL if weights.name == TORCHSCRIPT_NAME else PYTORCH_FID_URL
    return (f"Inception weights {weights.name} (FID protocol {protocol}) not found in {weights.parent}/ (offline): "
            f"fetch {url} and put it there")


def cleanfid_stats_folder():
    """clean-fid's stats folder (<site-packages>/cleanfid/stats), found without importing clean-fid."""
    spec = importlib.util.find_spec("cleanfid")
    if spec is None or not spec.origin:
        raise ConfigError("clean-fid is not installed: pip install clean-fid")
    return Path(spec.origin).parent / "stats"


def cleanfid_stats_name(dataset="cifar10", mode="clean", split="train", res=32):
    """The file name clean-fid gives its precomputed statistics."""
    return f"{dataset}_{mode}_{split}_{res}.npz".lower()


def missing_cleanfid_stats(protocol="tract"):
    """None, or one line: clean-fid's CIFAR-10 training-set statistics for ``protocol`` (those of its clean-fid mode,
    the same network and input path), where to fetch and put them."""
    name, folder = cleanfid_stats_name(mode=protocols.get(protocol).cleanfid_mode), cleanfid_stats_folder()
    if (folder / name).is_file():
        return None
    return (f"clean-fid's CIFAR-10 training-set statistics {name} not found (offline): fetch {CLEANFID_STATS_URL}/{name} "
            f"and put it in {folder}/")
