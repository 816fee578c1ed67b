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
  count, each point labelled with its w (written by :func:`plot`, beside guided.png);
- ``results/digits/guided_grids.png``: samples with one row per class at w = 0, 1, 4.
"""
import functools
import json
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from tabulate import tabulate

from tract_repro.common.files import write_atomic
from tract_repro.evaluation import protocols
from tract_repro.evaluation.generate import labels_from_seeds
from tract_repro.results.experiments import eval_file, read_evaluations

matplotlib.use("Agg")
import matplotlib.image as mpimg  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402

EVAL_DIR = Path("results/digits/eval")
METRICS = ("digits_fd", "class_accuracy", "digits_is")
#: written by evaluations since precision, recall, class FD and fidelity_to were added (blank in older ones)
NEW_METRICS = ("precision", "recall", "class_fd")
SUMMARISED = (*METRICS, "fidelity_rmse", *NEW_METRICS)
#: what each row is also described by: its fidelity reference, the class counts behind class FD, digits-IS's ceiling
DESCRIPTIONS = ("fidelity_to", "class_fd_counts", "digits_is_perfect")
SATURATED = 0.99  # class accuracy ≥ 0.99, or digits-IS ≥ 0.99 × its ceiling, in every row: the column is saturated
GRID_WS = (0.0, 1.0, 4.0)
DIGITS_CLASSES = 10
ROLES = {"stage 1": "stage 1", "guided teacher": "the guided teacher", "self": "itself", "teacher": "its teacher",
         "w-conditioned teacher": "its w-conditioned teacher"}


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
                                    noise_floor=metrics["digits_fd_noise_floor"], samples=metrics["samples"]))
    return pd.DataFrame.from_records(records, columns=["row", "w", "seed", "nfe", "steps", "sampler", *SUMMARISED,
                                                       *DESCRIPTIONS, "noise_floor", "samples"])


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
    extra = {"digits_fd": ["paper (ImageNet 64 FID)"], "fidelity_rmse": ["against (same seeds, same w)"],
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


def render(table, summary, checks, params):
    """The Markdown page."""
    labels = {r["id"]: r["label"] for r in table["rows"]}
    out = [f"# {table['title']}\n",
           "Guidance: x̂^w = (1 + w)·x̂(x_t, c) − w·x̂(x_t, ∅), so w = 0 is the conditional model and w = −1 the "
           "unconditional one; libraries that write a guidance *scale* s (diffusers, Imagen) have s = 1 + w. The "
           "guided teacher makes both predictions in one network call on a doubled batch, counted as 2 NFE a step "
           "(at w = 0 it needs only the conditional half); the w-conditioned students take w as an input, 1 NFE a step.\n",
           f"Paper setting: {table['paper']['setting']}.  \nPaper claim: {table['ordering']['claim']}.\n",
           "Digits setting (params.yaml): teacher "
           f"{params['guided_teacher_total']} samples with label dropout 0.1; stage 1 {params['guided_stage1_total']} "
           f"samples at w ~ U[0, 4]; stage 2 BTD 64→32→…→1 at {params['guided_btd_phase']} samples a halving (the stochastic "
           f"students: one more phase of {params['guided_btd_phase']}), TRACT 64→16→K at {params['guided_tract_phase']} "
           "samples a phase (the 64→16 phase shared by every K), w ~ U[0, 4] per sample, the same w for teacher, "
           "self-teacher and student. Students: mean ± std over seeds "
           f"{table['digits']['seeds']}; the teacher and stage 1 are trained once.\n"]
    if summary.empty:
        out.append("No evaluations yet: run `dvc repro digits_guided`.\n")
        return "\n".join(out)
    counts = ", ".join(sorted({c for c in summary.class_fd_counts if c}))
    sections = (
        ("digits_fd", "digits-FD (lower is better)", 2, ""),
        ("fidelity_rmse", "Fidelity: RMSE to the model the row distils (lower is better)", 4,
         "Pixel RMSE (images in [−1, 1]) between a row's samples and its reference's 64-step DDIM samples from the same "
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
    if floor is not None:
        out.append(f"digits-FD noise floor (two halves of the real set): {floor:.2f}; {samples} samples per evaluation, "
                   "one seed each, labels drawn per seed. Pictures: `results/digits/guided.png` (digits-FD against class "
                   "accuracy and against w), `results/digits/guided_pr.png` (precision against recall over w), "
                   "`results/digits/guided_grids.png` (one row per class at w = 0, 1, 4). Blank cells: not measured, or "
                   "an evaluation from before that metric. Paper values: "
                   "`guided-notes.md` §1a (S: a reliable secondary source); every other published guided number is unknown "
                   "here. Regenerate with `dvc repro digits_guided`.")
    return "\n".join(out) + "\n"


def plot(table, summary, path):
    """One panel per step count, one curve per row over w: digits-FD against class accuracy (Meng et al.'s FID/IS
    figure at digits scale; top), and digits-FD against w (bottom, where the accuracy saturates).  Also writes
    ``<stem>_pr.png`` beside it (:func:`plot_precision_recall`)."""
    labels = {r["id"]: r["label"] for r in table["rows"]}
    steps = sorted({int(s) for s in summary.steps})
    fig, axes = plt.subplots(2, len(steps), figsize=(3.2 * len(steps), 6.4), squeeze=False)
    for col, k in enumerate(steps):
        top, bottom = axes[0][col], axes[1][col]
        for row, group in summary[summary.steps == k].groupby("row", sort=False):
            group = group.sort_values("w")
            line, = top.plot(group.class_accuracy_mean, group.digits_fd_mean, marker="o", ms=3, label=labels[row])
            for r in group.itertuples():
                if r.w in (group.w.min(), group.w.max()):
                    top.annotate(f"w={r.w:g}", (r.class_accuracy_mean, r.digits_fd_mean), fontsize=5)
            bottom.errorbar(group.w, group.digits_fd_mean, yerr=group.digits_fd_std.fillna(0), marker="o", ms=3,
                            capsize=2, color=line.get_color(), label=labels[row])
        top.set_title(f"{k} step{'s' if k > 1 else ''}", fontsize=8)
        top.set_xlabel("class accuracy", fontsize=7)
        bottom.set_xlabel("guidance weight w", fontsize=7)
        for ax in (top, bottom):
            ax.set_yscale("log")
            ax.tick_params(labelsize=6)
        bottom.legend(fontsize=5)
    axes[0][0].set_ylabel("digits-FD (log)", fontsize=7)
    axes[1][0].set_ylabel("digits-FD (log), mean ± std over seeds", fontsize=7)
    fig.suptitle(f"{table['title']}", fontsize=8)
    fig.tight_layout()
    write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=130))
    plt.close(fig)
    plot_precision_recall(table, summary, Path(path).with_name(f"{Path(path).stem}_pr.png"))


def plot_precision_recall(table, summary, path):
    """Precision against recall (k = 3, the digits classifier's features), one panel per step count, one curve per
    row over w with each point labelled by its w; rows without precision and recall (older evaluations) are left
    out, and a figure with none says so."""
    labels = {r["id"]: r["label"] for r in table["rows"]}
    measured = summary[summary.precision_mean.notna() & summary.recall_mean.notna()]
    steps = sorted({int(s) for s in measured.steps})
    columns = min(max(len(steps), 1), 3)
    rows = -(-max(len(steps), 1) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.6 * columns, 3.4 * rows), squeeze=False)
    for ax in axes.flat[len(steps):]:
        ax.axis("off")
    if not steps:
        axes[0][0].text(0.5, 0.5, "no precision or recall in these evaluations:\nevaluate again to measure them",
                        ha="center", va="center", fontsize=8)
    for i, k in enumerate(steps):
        ax = axes.flat[i]
        for row, group in measured[measured.steps == k].groupby("row", sort=False):
            group = group.sort_values("w")
            ax.plot(group.recall_mean, group.precision_mean, marker="o", ms=3, label=labels[row])
            for r in group.itertuples():
                ax.annotate(f"{r.w:g}", (r.recall_mean, r.precision_mean), fontsize=5, xytext=(2, 2),
                            textcoords="offset points")
        ax.set_title(f"{k} step{'s' if k > 1 else ''} (labels: w)", fontsize=8)
        ax.set_xlabel("recall (k = 3)", fontsize=7)
        ax.set_ylabel("precision (k = 3), mean over seeds", fontsize=7)
        ax.set_xlim(0, 1.02)
        ax.set_ylim(0, 1.02)
        ax.tick_params(labelsize=6)
        ax.legend(fontsize=5, loc="lower left")
    fig.suptitle("Guided distillation: precision against recall over w\n(k = 3, digits classifier features)", fontsize=8)
    fig.tight_layout()
    write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=130))
    plt.close(fig)


def plot_grids(table, path, rows=("teacher_64", "stage1_64", "btd_4steps", "tract_4steps", "btd_stochastic_4steps"),
               eval_dir=EVAL_DIR):
    """Class grids (one row per class) of seed 0, one panel per (row, w) for w = 0, 1, 4."""
    labels = {r["id"]: r["label"] for r in table["rows"]}
    found = {(row["id"], w): ev for row, w, ev in evaluations(table)}
    rows = [r for r in rows if any((r, w) in found for w in GRID_WS)]
    if not rows:
        return False
    fig, axes = plt.subplots(len(rows), len(GRID_WS), figsize=(2.2 * len(GRID_WS), 2.3 * len(rows)), squeeze=False)
    for i, row in enumerate(rows):
        for j, w in enumerate(GRID_WS):
            ax = axes[i][j]
            ax.axis("off")
            ev = found.get((row, w))
            png = None if ev is None else Path(eval_file(ev, 0, root=str(eval_dir)).replace(
                ".json", f"_{ev['steps']}steps_w{w:g}_classes.png"))
            if png is not None and png.is_file():
                ax.imshow(mpimg.imread(png), cmap="gray")
            ax.set_title(f"{labels[row]}\nw = {w:g}", fontsize=6)
    fig.tight_layout()
    write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=130))
    plt.close(fig)
    return True


# ------------------------------------------------------------------------------------ paper scale

def paper_records(table, eval_dir="results/paper/eval"):
    """One record per (row, w) measured at paper scale: FID and IS, mean ± std over the seed ranges."""
    from tract_repro.results.experiments import paper_eval_file

    saved = read_evaluations("paper").get(table["table"], {})
    records = []
    for row in table["rows"]:
        for key, evaluation in saved.items():
            if key.split("@w")[0] != row["id"]:
                continue
            path = Path(paper_eval_file(evaluation, root=eval_dir))
            if not path.is_file():
                continue
            metrics = json.loads(path.read_text())
            hit = [r for r in metrics["results"] if r["steps"] == evaluation["steps"] and r.get("w") == evaluation.get("w")]
            if hit:
                r = hit[0]
                spec = protocols.of_metadata(r) or protocols.get(protocols.DEFAULT)
                records.append(dict(row=row["id"], w=evaluation.get("w"), sampler=r["sampler"], nfe=r["nfe"],
                                    protocol=spec.name, fid_mean=r["fid_mean"], fid_std=r["fid_std"], fid=r["fid"],
                                    fid_headline=spec.headline(r["fid"]), is_mean=r.get("is_mean"),
                                    is_std=r.get("is_std"), samples_per_range=r["samples_per_range"],
                                    seed_ranges=r["seed_ranges"], run=metrics["run"], weights_sha256=metrics["weights_sha256"]))
    return records


def training_samples(spec, table):
    """Samples a paper-scale row's model was trained on, as text: a stage-2 student's phases up to the one that
    makes its steps (all of them for a stochastic-sampler student), else the whole run (teacher, stage 1)."""
    from tract_repro.common.lengths import format_samples
    from tract_repro.results.experiments import describe_run, paper_bindings

    if not spec:
        return ""
    source = dict(spec, **(table.get("paper_runs") or {}).get(spec.get("run"), {})) if spec.get("run") else spec
    steps, lengths, _, _ = describe_run(source["gin"], paper_bindings(source))
    if spec.get("run") or spec.get("sampler", "ddim") != "ddim":
        upto = len(lengths)
    else:
        upto = next((p + 1 for p in range(len(lengths)) if steps[p + 1] == spec["steps"]), len(lengths))
    return format_samples(sum(lengths[:upto])) + ("" if spec.get("run") else " (stage 2)")


def render_paper(table, records):
    """results/<table>.md at paper scale: FID and IS per (row, w), beside the paper's values."""
    frame = pd.DataFrame.from_records(records, columns=["row", "w", "sampler", "nfe", "protocol", "fid_mean", "fid_std",
                                                        "fid_headline", "is_mean", "is_std", "samples_per_range"])
    ws = (table.get("paper") or {}).get("w") or []
    by = {(r.row, float(r.w)): r for r in frame.itertuples()}
    out = [f"# {table['title']}\n",
           "Guidance: x̂^w = (1 + w)·x̂(x_t, c) − w·x̂(x_t, ∅), w = 0 conditional (a guidance scale s = 1 + w elsewhere); "
           "the guided teacher is counted as 2 NFE a step.\n",
           f"Paper setting: {table['paper']['setting']}.  \nPaper claim: {table['ordering']['claim']}.\n"]
    for metric, title in (("fid", "FID (lower is better)"), ("is", "Inception Score (higher is better)")):
        lines = []
        for row in table["rows"]:
            p = row.get("paper") or {}
            paper = "" if p.get("value") is None else f"{p['value']} ({p.get('confidence')})"
            cells = [by.get((row["id"], float(w))) for w in ws]
            head = "fid_headline" if metric == "fid" else "is_mean"  # FID: the protocol's headline (EDM: best range)
            shown = [("" if c is None or pd.isna(getattr(c, head)) else
                      _cell(getattr(c, head), getattr(c, f"{metric}_std"), 2)) for c in cells]
            trained = [training_samples(row.get("paper_scale"), table)] if metric == "fid" else []
            lines.append([row["label"], *trained, paper if metric == "fid" else "", *shown])
        out += [f"## {title}\n", tabulate(lines, headers=["row", *(["training samples"] if metric == "fid" else []),
                                                          "paper" if metric == "fid" else "",
                                                          *[f"w = {w:g}" for w in ws]], tablefmt="github"), ""]
    if frame.empty:
        out.append("Nothing measured at paper scale yet: `dvc repro " + table["table"] + "` on a cluster with the data "
                   "(README, Paper scale).")
    else:
        used = "; ".join(f"FID protocol {p}: {protocols.get(p).description}" for p in sorted(set(frame["protocol"])))
        out.append(f"FID (the protocol's headline: the mean, or EDM's best range) ± std and IS mean ± std over 3 seed "
                   f"ranges of {int(frame.samples_per_range.iloc[0]):,} samples ({used}; IS over 10 splits of each "
                   f"range); {len(frame)} of the table's cells measured.")
    out.append("Training samples: a stage-2 student's, from the stage-1 model (trained once, its own row); every row's "
               "count comes from its gin file and bindings.")
    out.append("Paper values: `docs/paper-numbers.md` (S: reliable secondary source); unknown cells say so in "
               f"`experiments/{table['table']}.yaml`. Regenerate with `dvc repro {table['table']}`.")
    return "\n".join(out) + "\n"
