"""The model card (README.md, Hugging Face's format) of an export, and the evaluations it reports.

An evaluation is reported only if its file records the sha256 of the very weights exported (``weights_sha256``,
which ``python -m tract_repro.evaluate`` and ``python -m tract_repro.evaluation.fid evaluate`` write): files named
with ``--metrics``, ``RUN/eval/*.json``, and ``results/*/eval/**/*.json`` under the current folder (where the digits
pipeline writes them).  A named file of other weights is refused; a found one is left out.  Nothing is estimated:
without such a file the card says the model was not evaluated.
"""
import json
from dataclasses import dataclass
from pathlib import Path

from tract_repro.common.errors import ConfigError
from tract_repro.common.files import sha256
from tract_repro.evaluation.runs import image_shape
from tract_repro.networks.guidance import takes_input

DIGITS_PROTOCOL = "digits-FD, classifier features"
TAGS = {"TRACT": "tract", "BTD": "binary-time-distillation", "GuidedDistillation": "guided-distillation",
        "TeacherTraining": "teacher", "ImportedTeacher": "teacher"}
DISTILLED = ("TRACT", "BTD")  # methods whose student takes fewer steps than its teacher
METHODS = {
    "TRACT": "TRACT (transitive closure time distillation)",
    "BTD": "BTD (binary time distillation, progressive distillation's halving)",
    "GuidedDistillation": "guided distillation, stage 1 (a w-conditioned student of a guided teacher)",
    "TeacherTraining": "a teacher (diffusion training from data, no distillation)",
    "ImportedTeacher": "an imported teacher checkpoint (no training here)",
}


@dataclass
class Evaluation:
    path: Path
    data: dict
    sha256: str


def _read(path):
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    rows = data.get("results") if isinstance(data, dict) else None
    if not isinstance(rows, list) or not any(isinstance(r, dict) and ("digits_fd" in r or "fid_mean" in r) for r in rows):
        return None
    return data


def evaluations(run_path, ema_sha256, named=(), search=Path("results")):
    """The evaluation files of these weights: every ``named`` file (refused in one line if it is not an evaluation
    of them), then those found in ``RUN/eval`` and ``search``; each file once."""
    found, seen = [], set()
    for path in map(Path, named):
        data = _read(path) if path.is_file() else None
        if data is None:
            raise ConfigError(f"--metrics {path}: not an evaluation file (the JSON that `python -m tract_repro.evaluate` "
                              f"or `python -m tract_repro.evaluation.fid evaluate` writes)")
        if data.get("weights_sha256") != ema_sha256:
            raise ConfigError(f"--metrics {path} evaluates other weights (sha256 {str(data.get('weights_sha256'))[:16]}…), "
                              f"not {run_path}/ema.pt ({ema_sha256[:16]}…): evaluate this run, or leave the file out")
        found.append(Evaluation(path, data, sha256(path)))
        seen.add(path.resolve())
    candidates = sorted(Path(run_path, "eval").glob("*.json"))
    if Path(search).is_dir():
        candidates += sorted(Path(search).glob("*/eval/**/*.json"))
    for path in candidates:
        if path.resolve() in seen:
            continue
        data = _read(path)
        if data is not None and data.get("weights_sha256") == ema_sha256:
            found.append(Evaluation(path, data, sha256(path)))
            seen.add(path.resolve())
    return found


def _fid_protocol(data, row):
    """How an image FID was measured: the file's ``protocol`` (described), else its clean-fid ``mode``."""
    protocol = data.get("protocol")
    if isinstance(protocol, str):
        return protocol
    if isinstance(protocol, dict):
        what = protocol.get("description") or protocol.get("name") or (
            f"clean-fid mode {protocol['mode']}" if protocol.get("mode") else None)
        ranges = protocol.get("seed_ranges") or row.get("seed_ranges") or []
        size = protocol.get("samples_per_range") or row.get("samples_per_range")
        parts = [what or "FID", f"{len(ranges)} seed ranges × {size} samples" if ranges and size else None,
                 protocol.get("headline")]
        return "; ".join(p for p in parts if p)
    mode = row.get("mode") or data.get("mode")
    return f"clean-fid mode {mode}" if mode else "FID (protocol not recorded)"


def metric_rows(evaluation):
    """One dict per result row: steps, NFE, w, sampler, metric, value text, protocol, file."""
    data, rows = evaluation.data, []
    for r in data["results"]:
        common = dict(steps=r.get("steps"), nfe=r.get("nfe"), w=r.get("w"), sampler=data.get("sampler") or r.get("sampler"),
                      file=str(evaluation.path))
        if "digits_fd" in r:
            seeds = data.get("seeds")
            protocol = DIGITS_PROTOCOL + (f"; {data.get('samples')} samples, seeds {seeds[0]}..{seeds[1]}" if seeds else "")
            if data.get("digits_fd_noise_floor") is not None:
                protocol += f"; noise floor {data['digits_fd_noise_floor']:.3f}"
            value = f"{r['digits_fd']:.4g}"
            if r.get("fidelity_rmse") is not None:
                value += f" (teacher fidelity RMSE {r['fidelity_rmse']:.4g})"
            rows.append(dict(common, metric="digits-FD", value=value, protocol=protocol))
        elif "fid_mean" in r:
            headline = r.get("fid_headline", r["fid_mean"])
            value = f"{headline:.4g}"
            if r.get("fid_std") is not None:
                value += f" (mean {r['fid_mean']:.4g} ± {r['fid_std']:.3g})"
            rows.append(dict(common, metric="FID", value=value, protocol=_fid_protocol(data, r)))
    return rows


def _steps(info):
    steps = info.get("schedule_steps")
    return " → ".join(str(s) for s in steps) if steps else None


def default_steps(info):
    """The step count a run is sampled with by default: its final student's (a teacher's sample steps), else T."""
    return int(info.get("final_student_steps") or (info.get("schedule_steps") or [info["T"]])[-1])


def guidance_mode(run):
    """How a guidance weight reaches the model, as evaluation decides it (``metrics.conditioned``): a network input
    ('input'), classifier-free guidance of a teacher trained with label dropout ('classifier-free'), or not at all."""
    if takes_input(run.denoiser, "w"):
        return "input"
    return "classifier-free" if run.info.get("p_uncond") else "none"


def render(run, fmt, ema_sha256, weights_file, weights_sha256, found, layout=None):
    """README.md: YAML front matter, then what the model is, how it was trained and evaluated, and how to load it;
    ``layout``: (pipeline_tag, the Use lines) of a layout that says its own (a latent export), else ours."""
    info, guidance = run.info, guidance_mode(run)
    clipped = "clipped x̂" if run.bounded else "unclipped x̂"
    method = info.get("method", "unknown")
    classes = getattr(run.denoiser.net, "num_classes", 1)
    tags = ["diffusion", "diffusion-distillation", TAGS.get(method, method.lower()), "tract-repro",
            *([info["dataset"]] if info.get("dataset") else []),
            "class-conditional" if classes > 1 else "text-to-image" if layout and layout[0] == "text-to-image"
            else "unconditional"]
    front = ["---", f"library_name: {'diffusers' if fmt == 'diffusers' else 'tract-repro'}", "tags:",
             *[f"- {t}" for t in dict.fromkeys(tags)],
             f"pipeline_tag: {layout[0] if layout else 'unconditional-image-generation'}", "---", ""]
    K = default_steps(info)
    lines = [f"# {method} on {info.get('dataset', 'its data set')}: {K}-step sampling", "",
             f"Exported from a finished tract-repro run, `{run.path}`, by "
             f"`python -m tract_repro.export --format {fmt}`: the inference EMA's weights (`ema.pt`, sha256 "
             f"`{ema_sha256}`).", "", "## Model", "",
             f"- **Method**: {METHODS.get(method, method)}."]
    if method in DISTILLED and _steps(info):
        lines.append(f"- **Schedule** (student step counts S₀ → … → S_P): {_steps(info)}; sampled with K = {K} DDIM steps "
                     f"({clipped}) by default, any K dividing T = {info.get('T')} allowed.")
        for p in info.get("phases") or []:
            lines.append(f"  - phase {p['index']}: {p['teacher_steps']} → {p['student_steps']} steps, training samples "
                         f"{p['start']:,}–{p['end']:,}")
    elif info.get("parameterisation") == "edm":
        lines.append(f"- **Sampling**: tract-repro's `ddim` sampler (DDIM-VE, K dividing T = {info.get('T')}; K = {K} by "
                     f"default) or `heun` (EDM's own K-step ρ-grid); no step distillation.")
    else:
        lines.append(f"- **Sampling**: K = {K} DDIM steps ({clipped}) by default, any K dividing T = {info.get('T')} "
                     f"allowed; no step distillation.")
    lines.append(f"- **Time grid**: T = {info.get('T')}, {info.get('noise_schedule')} noise schedule, "
                 f"{info.get('parameterisation')} parameterisation.")
    if info.get("teacher"):
        lines.append(f"- **Teacher**: `{info['teacher']}`, sha256 `{info.get('teacher_sha256', 'not recorded')}`.")
    elif info.get("source"):
        lines.append(f"- **Source checkpoint**: `{info['source']}`, sha256 `{info.get('source_sha256', 'not recorded')}`.")
    else:
        lines.append("- **Teacher**: none (trained from data).")
    if info.get("samples") is not None:
        lines.append(f"- **Training**: {info['samples']:,} training samples (batch {info.get('batch_size')}, seed "
                     f"{info.get('seed')}), inference EMA `{info.get('inference_ema')}`, {info.get('parameters', 0):,} parameters.")
    if classes > 1:
        lines.append(f"- **Conditioning**: {classes} classes (`class_labels`, one per sample).")
    if guidance == "input":
        low, high = info.get("w_range") or (None, None)
        keyword = "`guidance_weight`" if layout is None else "diffusers' `guidance_scale` = 1 + w"
        lines.append(f"- **Guidance**: w is a network input ({keyword}), trained on w ∈ [{low}, {high}]; one "
                     f"network call a step.")
    elif guidance == "classifier-free":
        lines.append(f"- **Guidance**: trained with label dropout (p = {info.get('p_uncond')}): `guidance_weight` w "
                     f"gives x̂ = (1 + w)·x̂(c) − w·x̂(∅), two predictions a step (s = 1 + w).")
    lines += ["", "## Evaluation", ""]
    rows = [r for e in found for r in metric_rows(e)]
    if rows:
        lines += ["| K steps | NFE | w | sampler | metric | value | protocol | file |", "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['steps']} | {r['nfe']} | {'' if r['w'] is None else r['w']} | {r['sampler'] or ''} | {r['metric']} "
                  f"| {r['value']} | {r['protocol']} | `{r['file']}` |" for r in rows]
        lines += ["", "Each file records the sha256 of the weights it evaluated, which is this model's: "
                  + ", ".join(f"`{e.path}` (sha256 `{e.sha256[:16]}…`)" for e in found) + "."]
    else:
        lines.append("Not evaluated: no evaluation of these weights was given (`--metrics`) or found (`RUN/eval/*.json`, "
                     "`results/*/eval/**/*.json`).")
    lines += ["", "## Files", "", f"- `{weights_file}`: the weights (safetensors, sha256 `{weights_sha256}`).",
              "- `config.gin`: the run's resolved configuration; `run.json`: its record (method, schedule, teacher, samples)."]
    lines += layout[1] if layout else usage(fmt, K, classes, guidance, image_shape(run.denoiser))
    return "\n".join(front + lines) + "\n"


def usage(fmt, K, classes, guidance, shape):
    """How to load the export, and what maps onto diffusers and what does not."""
    labels = "labels = torch.tensor([0, 1, 2, 3])" if classes > 1 else "labels = None"
    extra = "{'w': torch.full((4,), 1.0, dtype=torch.float64)}" if guidance == "input" else "{}"
    lines = ["", "## Use", "", "With tract-repro (`pip install 'tract-repro[export]'`), the run rebuilt from these files "
             "(safetensors only, no pickle):", "", "```python", "import torch",
             "from tract_repro.exporting import load_exported", "from tract_repro.networks.conditioning import Cond",
             "from tract_repro.sampling import registry", "from tract_repro.sampling.samplers import noise_from_seeds", "",
             "run = load_exported('THIS_FOLDER')  # .denoiser, .grid, .info (run.json)",
             f"noise = noise_from_seeds(range(4), {tuple(shape)})  # one seed per sample, as tract-repro evaluates",
             labels, f"x = registry.sample('ddim', run.denoiser, run.grid, {K}, noise, Cond(labels, {extra})).clamp(-1, 1)",
             "```"]
    extra = (", class_labels=[0, 1, 2, 3]" if classes > 1 else "") + (", guidance_weight=1.0" if guidance == "input" else "")
    if fmt == "diffusers":
        lines += ["", "With diffusers (the pipeline's code ships in this folder, hence `trust_remote_code=True`; the network "
                  "class comes from tract-repro, so `pip install tract-repro` too):", "", "```python", "import torch",
                  "from diffusers import DiffusionPipeline", "",
                  "pipe = DiffusionPipeline.from_pretrained('THIS_FOLDER', trust_remote_code=True)",
                  f"images = pipe(num_inference_steps={K}, generator=[torch.Generator().manual_seed(s) for s in range(4)]"
                  f"{extra}).images", "```", "", "One generator per sample draws the noise tract-repro draws for those seeds; "
                  "with the same class labels and w, the images are tract-repro's samples (x/2 + 1/2).", "", "## What maps onto diffusers", "",
                  "- `pipeline.py`: `TractPipeline`, tract-repro's K-step DDIM sampler (clipped x̂, float64) written out; "
                  "the same samples as tract-repro from the same noise.",
                  "- `scheduler/`: the run's time grid (λ, α, σ at i = 0..T) as a scheduler config; diffusers' DDIMScheduler "
                  "is not used (its timestep grid and float32 steps differ from the run's).",
                  "- `unet/`: tract-repro's PD UNet, **not** diffusers' `UNet2DModel` (log-SNR time input, summed class and "
                  "w embeddings, another block layout): a ModelMixin component that builds tract-repro's network, its "
                  "weights stored as diffusers stores them (`diffusion_pytorch_model.safetensors`)."]
    return lines
