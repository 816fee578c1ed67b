"""Weights as safetensors: a denoiser's state dict with string metadata, written and read without pickle."""
import importlib
import json
from importlib import metadata as package_metadata

from tract_repro.common.errors import ConfigError


def require(package, fmt):
    """Import ``package`` (safetensors, diffusers) or say in one line how to install it."""
    try:
        return importlib.import_module(package)
    except ImportError:
        raise ConfigError(f"--format {fmt} needs the {package} package, which is not installed: "
                          f"pip install 'tract-repro[export]'") from None


def version():
    """This package's version, for ``exported_by``."""
    try:
        return package_metadata.version("tract-repro")
    except package_metadata.PackageNotFoundError:
        return "unknown"


def tensors(state_dict):
    """The state dict as safetensors stores it: CPU tensors, contiguous, none sharing memory with another (tied or
    viewed tensors are stored once per key, as their own copy; loading them back with load_state_dict ties them again)."""
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}


def run_metadata(run, ema_sha256):
    """safetensors metadata (strings only): what the weights are and where they come from."""
    info = run.info
    fields = dict(method=info.get("method"), T=info.get("T"), schedule_steps=info.get("schedule_steps"),
                  final_student_steps=info.get("final_student_steps"), parameterisation=info.get("parameterisation"),
                  noise_schedule=info.get("noise_schedule"), dataset=info.get("dataset"), samples=info.get("samples"),
                  inference_ema=info.get("inference_ema"), teacher=info.get("teacher"),
                  teacher_sha256=info.get("teacher_sha256"), w_range=info.get("w_range"), p_uncond=info.get("p_uncond"),
                  ema_sha256=ema_sha256, exported_by=f"tract-repro {version()}")
    return {"format": "pt", **{k: v if isinstance(v, str) else json.dumps(v) for k, v in fields.items() if v is not None}}


def save(state_dict, path, meta):
    """Write ``state_dict`` to ``path`` as safetensors with ``meta``."""
    from safetensors.torch import save_file

    save_file(tensors(state_dict), str(path), metadata=meta)
    return path


def load(path):
    """(tensors, metadata) of a safetensors file; nothing is unpickled."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except (OSError, SafetensorError) as exc:
        raise ConfigError(f"{path} cannot be read as safetensors ({type(exc).__name__}): export the run again") from None
