"""Find and load a teacher: a previous run's directory, a .pt weights file, or an imported checkpoint.

``train.teacher`` chooses the source: a run directory (its ema.pt), a ``.pt`` state dict, an
NVIDIA EDM snapshot ``*.pkl`` (allow-list unpickler, no code runs), a Google PD Flax
checkpoint such as ``cifar_original`` (read as msgpack; nothing is unpickled), or a local diffusers
folder such as Stable Diffusion's (its UNet or DiT safetensors, for a ``diffusers_network`` student; its
scheduler's prediction type is the teacher's parameterisation).

:func:`import_teacher` turns an imported checkpoint into a finished run directory of its own
(``python -m tract_repro.import_teacher``).
"""
import json
from pathlib import Path

import gin

from tract_repro.common.errors import ConfigError


class TeacherError(ConfigError):
    """The teacher named in gin is missing, unfinished or incompatible."""


def resolve(spec, gin_dir="gin"):
    """The weights file of a teacher given as a run directory or a .pt file."""
    path = Path(spec)
    hint = f"`python -m tract_repro.launch {_gin_hint(path, gin_dir)} --workdir {path}`"
    if path.is_dir() and (path / "model_index.json").is_file():  # a diffusers folder: its UNet's (DiT's) weights
        from tract_repro.networks.diffusers_net import weights_file

        return weights_file(path)
    if path.is_dir():
        if (path / "ema.pt").is_file():
            return path / "ema.pt"
        if (path / "checkpoints").is_dir():
            raise TeacherError(f"teacher run {path} is not finished: resume it with {hint}")
        raise TeacherError(f"teacher run {path} has no ema.pt: train it first with {hint}")
    if path.is_file():
        return path
    raise TeacherError(f"teacher {spec} not found: train it first with {hint}, or point train.teacher at a weights file")


def read_weights(path, denoiser):
    """A state dict for ``denoiser`` from a run's ema.pt / a .pt file (weights_only), or else a Google PD Flax checkpoint."""
    path = Path(path)
    from tract_repro.networks.diffusers_net import folder_of, folder_state

    folder = folder_of(path)
    if folder is not None:  # a diffusers folder's UNet or DiT, as the diffusers_network it builds
        return {f"net.{k}": v for k, v in folder_state(folder).items()}
    if path.suffix in (".pt", ".pth"):
        from tract_repro.training import checkpoint as ckpt

        return ckpt.load(path)
    if path.suffix == ".pkl":  # NVIDIA EDM snapshot, through the allow-list unpickler
        from tract_repro.networks.edm_pickle import load_edm_pickle

        state = {f"net.{k}": v for k, v in load_edm_pickle(path).state_dict.items()}
        if "net.model.map_augment.weight" not in denoiser.state_dict():  # unused at inference (no augment labels)
            state.pop("net.model.map_augment.weight", None)
        return state
    from tract_repro.networks.google_pd import load_google_pd  # msgpack, never pickle

    return {f"net.{k}": v for k, v in load_google_pd(path, denoiser.net).items()}


def _teacher_info(weights):
    """What the teacher was trained with: its run.json, or a diffusers folder's parameterisation and schedule."""
    from tract_repro.networks.diffusers_net import folder_of, folder_process

    folder = folder_of(weights)
    if folder is not None:  # its ∅ (empty prompt, null class) is trained: SD and DiT drop 10% of conditions
        return dict(folder_process(folder), guided=True)
    info_file = weights.parent / "run.json"
    return json.loads(info_file.read_text()) if info_file.is_file() else {}


def _gin_hint(path, gin_dir):
    """The run file that trains a run called like ``path`` (runs/digits_teacher → gin/digits_teacher.gin)."""
    for root in (Path(gin_dir), Path(__file__).resolve().parents[2] / "gin"):
        if (root / f"{path.name}.gin").is_file():
            return f"gin/{path.name}.gin"
    return "gin/<teacher>.gin"


def fresh_prefixes(net, names):
    """The state-dict prefixes, under ``net.``, of the branches ``net`` has for the new inputs ``names`` (its own
    ``fresh_prefixes``: the PD and EDM nets' ``cond_emb.<name>.``, a diffusers UNet's cond_proj); none for a
    network without extra inputs."""
    own = getattr(net, "fresh_prefixes", None)
    return tuple(f"net.{prefix}" for prefix in own(names)) if own is not None and names else ()


def load_into(denoiser, spec, expect=None, new_inputs=(), guided=False):
    """Load teacher weights into ``denoiser``; check ``expect`` (e.g. parameterisation) against its run.json.

    ``new_inputs``: extra inputs of ``denoiser`` the teacher lacks; their branches (:func:`fresh_prefixes`) keep
    their initial (zero) weights.  ``guided``: the teacher must have been trained with label dropout (p_uncond > 0).
    """
    weights = resolve(spec)
    info = _teacher_info(weights)
    for key, value in (expect or {}).items():
        if key in info and info[key] != value:
            raise TeacherError(f"teacher {spec} was trained with {key} = {info[key]!r} but this run uses "
                               f"{value!r}: make them agree in gin")
    if guided and not (info.get("p_uncond") or info.get("guided")):
        raise TeacherError(f"teacher {spec} was not trained with label dropout, so it has no unconditional prediction "
                           f"to guide with: train it with TeacherTraining.p_uncond = 0.1 and UNet.null_class = True")
    state = read_weights(weights, denoiser)
    own = denoiser.state_dict()
    net = getattr(denoiser, "net", None)
    fresh = fresh_prefixes(net, new_inputs)
    missing = {k for k in own.keys() - state.keys() if not k.startswith(fresh)} if fresh else own.keys() - state.keys()
    unexpected = state.keys() - own.keys()
    if missing and all(k.startswith(fresh_prefixes(net, ("w",))) for k in missing):
        drop = net.w_input_setting
        raise TeacherError(f"teacher {weights} has no w input: distil guidance into it first (train.method = "
                           f"@GuidedDistillation(), stage 1), or {drop}")
    misshaped = [k for k in own.keys() & state.keys() if own[k].shape != state[k].shape]
    if missing or unexpected or misshaped:
        raise TeacherError(f"teacher {weights} does not fit this run's network ({len(missing)} missing, "
                           f"{len(unexpected)} unexpected, {len(misshaped)} mis-shaped tensors): "
                           f"use the teacher's network bindings")
    denoiser.load_state_dict(state, strict=not fresh)
    return weights


@gin.configurable(denylist=["workdir", "denoiser", "process"])
def import_teacher(workdir, denoiser, process, weights=gin.REQUIRED):
    """Load ``weights`` into ``denoiser`` and write it as the finished run ``workdir`` (ema.pt, run.json);
    returns the weights file read.  ``process``: the run's T, parameterisation and noise schedule, for run.json."""
    from tract_repro.common.files import sha256, write_json
    from tract_repro.training import checkpoint as ckpt

    workdir = Path(workdir)
    source = load_into(denoiser, weights)
    ckpt.save_atomic(denoiser.state_dict(), workdir / "ema.pt")
    info = dict(method="ImportedTeacher", source=str(source), source_sha256=sha256(source), T=process["T"],
                parameterisation=process["parameterisation"], noise_schedule=process["noise_schedule"],
                parameters=sum(p.numel() for p in denoiser.parameters()), status="complete")
    write_json(workdir / "run.json", info)
    return source
