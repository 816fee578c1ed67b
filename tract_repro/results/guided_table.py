"""results/guided.md: the guided distillation table, one column per guidance weight w, with its pictures.

Rendered by ``python -m tract_repro.results.tables guided`` for a table whose ``digits.w`` lists guidance
weights (experiments/guided.yaml).  Every row is evaluated at each w (``<row>@w<w>`` in
pipelines/evaluations.json); this module reads those evaluations and writes

- ``results/guided.md``: per (row, w), mean ± std over seeds: digits-FD beside the paper's values where known,
  fidelity (RMSE to the model the row distils: stage 1 for a stage-2 student, the guided teacher for stage 1),
  precision and recall (k = 3), the class-conditional FD, class accuracy and the digits Inception Score (a
  w column of those two marked "saturated" where every row is at its ceiling), with the paper's claims checked
  at every w.  Evaluations from before precision, recall, class FD and ``fidelity_to`` leave those cells blank;
- ``results/digits/guided.{json,csv}``: the same numbers (DVC metrics and plots);
- ``results/digits/guided.png``: digits-FD against class accuracy and against w, one curve per model, one
  panel per step count (Meng et al.'s FID/IS figure at digits scale);
- ``results/digits/guided_pr.png``: precision against recall over w, one curve per model, one panel per step
  count, each point labelled with its w (:mod:`tract_repro.results.guided_plots`);
- ``results/digits/guided_grids.png``: samples with one row per class at w = 0, 1, 4.

The pictures are drawn by :mod:`tract_repro.results.guided_plots`, the paper-scale table by
:mod:`tract_repro.results.guided_paper`.
"""
import functools
import json
from pathlib import Path

import numpy as np
import pandas as pd
from tabulate import tabulate

from tract_repro.common.errors import ConfigError
from tract_repro.evaluation.generate import labels_from_seeds
from tract_repro.results.experiments import eval_file, read_evaluations


EVAL_DIR = Path("results/digits/eval")
METRICS = ("digits_fd", "class_accuracy", "digits_is")
#: written by evaluations since precision, recall, class FD and fidelity_to were added (blank in older ones)
NEW_METRICS = ("precision", "recall", "class_fd")
SUMMARISED = (*METRICS, "fidelity_rmse", *NEW_METRICS)
#: what each row is also described by: its fidelity reference, the class counts behind class FD, digits-IS's ceiling
DESCRIPTIONS = ("fidelity_to", "class_fd_counts", "digits_is_perfect")
SATURATED = 0.99  # class accuracy ≥ 0.99, or digits-IS ≥ 0.99 × its ceiling, in every row: the column is saturated
GRID_WS = (0.0, 1.0, 4.0)  # the grids' guidance weights, unless the table's ``digits.grid_w`` lists others
DIGITS_CLASSES = 10
ROLES = {"stage 1": "stage 1", "guided teacher": "the guided teacher", "self": "itself", "teacher": "its teacher",
         "w-conditioned teacher": "its w-conditioned teacher"}


def grid_ws(table):
    """The guidance weights of the table's class grids: its ``digits.grid_w``, or w = 0, 1, 4."""
    return tuple(float(w) for w in table["digits"].get("grid_w", GRID_WS))


def evaluations(table):
    """[(row, w, evaluation)] in the table's row order, from pipelines/evaluations.json."""
    saved = read_evaluations("digits").get(table["table"], {})
    out = []
    for row in table["rows"]:
        for key, evaluation in saved.items():
            if key.split("@w")[0] == row["id"] and evaluation.get("w") is not None:
                out.append((row, evaluation["w"], evaluation))
    return out


def scores(table, eval_dir=EVAL_DIR):
    """One record per (row, w, seed): digits-FD, class accuracy, digits-IS, fidelity, precision, recall, class FD
    (NaN where an older evaluation lacks them), NFE, and what the fidelity is against."""
    records = []
    for row, w, evaluation in evaluations(table):
        for seed in evaluation["seeds"]:
            path = Path(eval_file(evaluation, seed, root=str(eval_dir)))
            if not path.is_file():
                continue
            metrics = json.loads(path.read_text())
            hit = [r for r in metrics["results"] if r["steps"] == evaluation["steps"] and r.get("w") == w]
            if hit:
                r = hit[0]
                records.append(dict(row=row["id"], w=w, seed=seed, nfe=r["nfe"], steps=evaluation["steps"],
                                    sampler=evaluation["sampler"],
                                    **{m: np.nan if r.get(m) is None else r[m] for m in SUMMARISED},
                                    fidelity_to=against(r, metrics), class_fd_counts=class_counts(metrics),
                                    digits_is_perfect=r.get("digits_is_perfect") or perfect_is(*metrics["seeds"]),
                                    noise_floor=metrics["digits_fd_noise_floor"], samples=metrics["samples"],
                                    reconstruction_floor=metrics.get("digits_fd_reconstruction_floor", np.nan)))
    return pd.DataFrame.from_records(records, columns=["row", "w", "seed", "nfe", "steps", "sampler", *SUMMARISED,
                                                       *DESCRIPTIONS, "noise_floor", "samples", "reconstruction_floor"])


def against(result, metrics):
    """What a result's fidelity RMSE is measured against, in words: its ``fidelity_to`` (the role and steps of the
    reference), or for an older evaluation the reference run's folder and steps."""
    to = result.get("fidelity_to")
    if to:
        return f"{ROLES.get(to['role'], to['role'])}, DDIM {to['steps']} steps"
    reference = metrics.get("reference") or {}
    if not reference.get("run"):
        return ""
    same = Path(reference["run"]) == Path(metrics.get("run", ""))
    return f"{'itself' if same else Path(reference['run']).name}, DDIM {reference['steps']} steps"


def class_counts(metrics):
    """'min-max' generated samples per class behind an evaluation's class-conditional FD ('' before it existed)."""
    counts = (metrics.get("class_fd") or {}).get("generated_per_class")
    return f"{min(counts)}-{max(counts)}" if counts else ""


@functools.lru_cache(maxsize=None)
def perfect_is(first_seed, last_seed, classes=DIGITS_CLASSES):
    """The digits-IS of samples classified with certainty as the class their seed asked for: exp(H(the asked-for
    labels' frequencies)), for evaluations written before they recorded it (``digits_is_perfect``)."""
    asked = np.bincount(labels_from_seeds(range(first_seed, last_seed + 1), classes).numpy(), minlength=classes)
    p = asked[asked > 0] / asked.sum()
    return float(np.exp(-(p * np.log(p)).sum()))


def summarise(records):
    """Mean, std and count over seeds per (row, w), with the first seed's fidelity reference and class counts (one
    per row) and the smallest digits-IS ceiling."""
    columns = ["row", "w", "nfe", "steps", "sampler", "n", "fidelity_rmse", *DESCRIPTIONS,
               *[f"{m}_{s}" for m in SUMMARISED for s in ("mean", "std")]]
    if records.empty:
        return pd.DataFrame(columns=columns)
    g = records.groupby(["row", "w"], sort=False)
    out = g.agg(nfe=("nfe", "first"), steps=("steps", "first"), sampler=("sampler", "first"), n=("digits_fd", "count"),
                fidelity_rmse=("fidelity_rmse", "mean"), fidelity_to=("fidelity_to", "first"),
                class_fd_counts=("class_fd_counts", "first"), digits_is_perfect=("digits_is_perfect", "min"))
    for m in SUMMARISED:
        out[f"{m}_mean"], out[f"{m}_std"] = g[m].mean(), g[m].std(ddof=1)
    return out.reset_index()[columns]


def claims(table, summary):
    """The paper's claims at every w: ``pairs`` (a lower digits-FD than b) and ``comparable``: a's digits-FD ≤ factor ×
    b's and, with ``comparable.fidelity`` naming a row r, a as close to the model it distils as r is to its own
    (a's fidelity RMSE ≤ r's at that w: stage 2's distillation error no larger than the one stage 1 already makes)."""
    fd = {(r.row, r.w): r.digits_fd_mean for r in summary.itertuples()}
    rmse = {(r.row, r.w): r.fidelity_rmse for r in summary.itertuples()}
    sampler = {(r.row, r.w): getattr(r, "sampler", "ddim") for r in summary.itertuples()}
    ws = sorted(set(summary.w)) if not summary.empty else []
    ordering = table["ordering"]
    out = []
    for a, b in ordering.get("pairs", []):
        for w in ws:
            holds = bool(fd[a, w] < fd[b, w]) if (a, w) in fd and (b, w) in fd else None
            out.append(dict(kind="better", better=a, worse=b, w=w, holds=holds))
    comparable = ordering.get("comparable") or {}
    bound = comparable.get("fidelity")
    for a, b in comparable.get("pairs", []):
        for w in ws:
            holds = bool(fd[a, w] <= comparable["factor"] * fd[b, w]) if (a, w) in fd and (b, w) in fd else None
            if bound is not None and holds is not None and sampler.get((a, w)) == "ddim":  # a sampler that re-noises
                # draws other samples from the same seeds: its RMSE measures the noise, not the distillation
                known = not (pd.isna(rmse.get((a, w))) or pd.isna(rmse.get((bound, w))))
                holds = (holds and bool(rmse[a, w] <= rmse[bound, w])) if known else None
            deterministic = sampler.get((a, w), "ddim") == "ddim"
            out.append(dict(kind="comparable", better=a, worse=b, w=w, holds=holds, factor=comparable["factor"],
                            fidelity=bound if deterministic else None, fd_only=bound is not None and not deterministic))
    return out


def _cell(mean, std, n, digits=2):
    if pd.isna(mean):
        return ""
    return f"{mean:.{digits}f}" if n < 2 or pd.isna(std) else f"{mean:.{digits}f} ± {std:.{digits}f}"


def _matrix(table, summary, metric, digits, saturated=()):
    """Rows × w of ``metric``'s mean ± std; digits-FD with the paper's value, fidelity with what it is against;
    the w columns in ``saturated`` say so in their header."""
    ws = sorted(set(summary.w))
    by = {(r.row, r.w): r for r in summary.itertuples()}
    lines = []
    for row in table["rows"]:
        cells = [by.get((row["id"], w)) for w in ws]
        first = next((c for c in cells if c is not None), None)
        if first is None:
            continue
        p = row.get("paper") or {}
        extra = []
        if metric == "digits_fd":
            extra = ["" if p.get("value") is None else f"{p['value']} ({p.get('confidence')})"]
        elif metric == "fidelity_rmse":
            extra = [next((c.fidelity_to for c in cells if c is not None and c.fidelity_to), "")]
        elif metric == "class_fd":
            extra = [next((c.class_fd_counts for c in cells if c is not None and c.class_fd_counts), "")]
        lines.append([row["label"], first.sampler, first.nfe, *extra,
                      *["" if c is None else _cell(getattr(c, f"{metric}_mean"), getattr(c, f"{metric}_std"), c.n, digits)
                        for c in cells]])
    extra = {"digits_fd": [table["paper"].get("column", "paper")], "fidelity_rmse": ["against (same seeds, same w)"],
             "class_fd": ["samples per class"]}.get(metric, [])
    headers = ["row", "sampler", "NFE", *extra, *[f"w = {w:g}" + (" (saturated)" if w in saturated else "") for w in ws]]
    text = list(range(3, len(headers)))  # cells as written: 0.800 stays 0.800
    return tabulate(lines, headers=headers, tablefmt="github", disable_numparse=text)


def saturated_columns(summary, metric):
    """The w at which every measured row is at the metric's ceiling: class accuracy ≥ 0.99, or digits-IS ≥ 0.99 ×
    the digits-IS of perfectly classified samples (exp H of the asked-for labels' frequencies: 9.90 for seeds
    0..499, 10 for exactly uniform labels)."""
    out = set()
    for w, cells in summary.groupby("w"):
        cells = cells[cells[f"{metric}_mean"].notna()]
        ceiling = 1.0 if metric == "class_accuracy" else cells.digits_is_perfect
        if len(cells) and bool((cells[f"{metric}_mean"] >= SATURATED * ceiling).all()):
            out.add(w)
    return out


def digits_setting(table, params):
    """The table's ``digits.setting`` with its {names} filled in from params.yaml's digits section ('' without one)."""
    text = table["digits"].get("setting")
    if not text:
        return ""
    try:
        return text.format(**params) + " "
    except KeyError as exc:
        raise ConfigError(f"experiments/{table['table']}.yaml: digits.setting names {{{exc.args[0]}}}, which "
                          f"params.yaml's digits section does not define: add it there or fix the name") from None


def render(table, summary, checks, params):
    """The Markdown page."""
    labels = {r["id"]: r["label"] for r in table["rows"]}
    out = [f"# {table['title']}\n",
           "Guidance: x̂^w = (1 + w)·x̂(x_t, c) − w·x̂(x_t, ∅), so w = 0 is the conditional model and w = −1 the "
           "unconditional one; libraries that write a guidance *scale* s (diffusers, Imagen) have s = 1 + w. The "
           "guided teacher makes both predictions in one network call on a doubled batch, counted as 2 NFE a step "
           "(at w = 0 it needs only the conditional half); the w-conditioned students take w as an input, 1 NFE a step.\n",
           f"Paper setting: {table['paper']['setting']}.  \nPaper claim: {table['ordering']['claim']}.\n",
           f"Digits setting (params.yaml): {digits_setting(table, params)}Students: mean ± std over "
           f"seeds {table['digits']['seeds']}; the teacher and stage 1 are trained once.\n"]
    name = table["table"]
    if summary.empty:
        out.append(f"No evaluations yet: run `dvc repro digits_{name}`.\n")
        return "\n".join(out)
    counts = ", ".join(sorted({c for c in summary.class_fd_counts if c}))
    sections = (
        ("digits_fd", "digits-FD (lower is better)", 2, ""),
        ("fidelity_rmse", "Fidelity: RMSE to the model the row distils (lower is better)", 4,
         "Pixel RMSE (images in [−1, 1]; a latent row's decoded images) between a row's samples and its reference's 64-step DDIM samples from the same "
         "seeds, labels and w: a stage-2 student (BTD, TRACT, the stochastic sampler's students) against **stage 1**, "
         "the model it distils; stage 1 against **the guided teacher** x̂^w = (1 + w)·x̂_c − w·x̂_∅; the teacher's rows "
         "against its own 64 steps. The stochastic sampler re-noises, so its students' RMSE includes that noise."),
        ("precision", "Precision, k = 3 (higher is better: fidelity)", 3,
         "Kynkäänniemi et al. 2019: the share of generated samples inside the real digits' k-NN manifold (the union of "
         "balls around each real point reaching its 3rd-nearest real neighbour), in the digits classifier's feature "
         "space (digits-FD's); the real set is a fixed subset of as many digits as there are samples."),
        ("recall", "Recall, k = 3 (higher is better: diversity)", 3,
         "The share of those real digits inside the generated samples' k-NN manifold."),
        ("class_fd", "Class-conditional FD (lower is better)", 2,
         "The mean over the 10 classes of the FD between the samples generated for a class (by the label they were "
         "asked for) and that class's real digits, in the same feature space; "
         + (f"{counts} generated samples per class against all of a class's real digits (about 180). "
            if counts else "") + "FD's small-sample bias is large at so few samples per class: compare rows, "
         "not the value with digits-FD."),
        ("class_accuracy", "Class accuracy (the classifier's class is the one asked for)", 3,
         "A w column is marked saturated where every row is ≥ 0.99."),
        ("digits_is", "Digits Inception Score (classifier-based; 10 is its maximum)", 2,
         "A w column is marked saturated where every row is within 1% of the score of perfectly classified samples, "
         "exp(H(asked-for labels)): 9.90 for these seeds' labels (10 for exactly uniform ones)."))
    for metric, title, digits, note in sections:
        saturated = saturated_columns(summary, metric) if metric in ("class_accuracy", "digits_is") else ()
        if summary[f"{metric}_mean"].isna().all():
            note += (" Not measured yet: these evaluations were written before it was (`dvc repro --force` the "
                     "guided evaluation stages to fill it in).")
        out += [f"## {title}\n", *([note, ""] if note else []), _matrix(table, summary, metric, digits, saturated), ""]
    out.append("## The paper's claims, checked at every w\n")
    for kind in ("comparable", "better"):
        rows = {}
        for c in (c for c in checks if c["kind"] == kind):
            rows.setdefault((c["better"], c["worse"]), []).append(c)
        for (a, b), cs in rows.items():
            marks = ", ".join(f"w {c['w']:g} " + ("✓" if c["holds"] else "✗" if c["holds"] is False else "?") for c in cs)
            relation = f"≤ {cs[0]['factor']}× digits-FD of" if kind == "comparable" else "has a lower digits-FD than"
            fidelity = (f", and its fidelity RMSE to the model it distils ≤ {labels[cs[0]['fidelity']]}'s"
                        if kind == "comparable" and cs[0].get("fidelity") else
                        " (digits-FD only: the sampler re-noises, so its samples are not the model's from the same seeds)"
                        if kind == "comparable" and cs[0].get("fd_only") else "")
            out.append(f"- {labels[a]} {relation} {labels[b]}{fidelity}: {marks}")
    held = [c for c in checks if c["holds"] is not None]
    out += ["", f"{sum(c['holds'] for c in held)} of {len(held)} checks hold (✓ holds, ✗ does not, ? not measured).", ""]
    references = [(row, (row.get("paper") or {}).get("reference")) for row in table["rows"]]
    references = [(row, ref) for row, ref in references if ref]
    if references:
        out += ["## Published values for reference (not comparable per w)\n",
                "Quoted for a different data set and an unstated guidance weight, so they sit in no w column:", ""]
        out += [f"- {row['label']}: {ref['value']} ({ref.get('confidence')}; {ref.get('source')}). {ref.get('note') or ''}"
                for row, ref in references]
        out.append("")
    for row in table["rows"]:  # rows evaluated at fewer guidance weights than the table's, and why
        if (row.get("digits") or {}).get("w") is not None:
            out.append(f"{row['label']}: evaluated at w = {', '.join(f'{w:g}' for w in row['digits']['w'])} only. "
                       f"{(row.get('paper') or {}).get('note') or ''}")
    out.append("")
    floor, samples = summary.attrs.get("noise_floor"), summary.attrs.get("samples")
    recon = summary.attrs.get("reconstruction_floor")
    if floor is not None:
        grid = ", ".join(f"{w:g}" for w in grid_ws(table))
        out.append(f"digits-FD noise floor (two halves of the real set): {floor:.2f}; "
                   + ("" if recon is None else f"reconstruction floor (the autoencoder's reconstructions of one half "
                                               f"against the other; decoded samples cannot do much better): {recon:.2f}; ")
                   + f"{samples} samples per evaluation, one seed each, labels drawn per seed. Pictures: "
                   f"`results/digits/{name}.png` (digits-FD against class accuracy and against w), "
                   f"`results/digits/{name}_pr.png` (precision against recall over w), `results/digits/{name}_grids.png` "
                   f"(one row per class at w = {grid}). Blank cells: not measured, or an evaluation from before that "
                   f"metric. Paper values: {table['paper'].get('values', 'none transcribed.')} Regenerate with `dvc repro digits_{name}`.")
    return "\n".join(out) + "\n"
