"""results/guided.md: the guided distillation table, one column per guidance weight w, with its pictures.

Rendered by ``python -m tract_repro.results.tables guided`` for a table whose ``digits.w`` lists guidance
weights (experiments/guided.yaml).  Every row is evaluated at each w (``<row>@w<w>`` in
pipelines/evaluations.json); this module reads those evaluations and writes

- ``results/guided.md``: digits-FD, class accuracy and the digits Inception Score per (row, w), mean ± std
  over seeds, beside the paper's values where known, with the paper's claims checked at every w;
- ``results/digits/guided.{json,csv}``: the same numbers (DVC metrics and plots);
- ``results/digits/guided.png``: digits-FD against class accuracy and against w, one curve per model, one
  panel per step count (Meng et al.'s FID/IS figure at digits scale);
- ``results/digits/guided_grids.png``: samples with one row per class at w = 0, 1, 4.
"""
import json
from pathlib import Path

import matplotlib
import pandas as pd
from tabulate import tabulate

from tract_repro.common.files import write_atomic
from tract_repro.evaluation import protocols
from tract_repro.results.experiments import eval_file, read_evaluations

matplotlib.use("Agg")
import matplotlib.image as mpimg  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402

EVAL_DIR = Path("results/digits/eval")
METRICS = ("digits_fd", "class_accuracy", "digits_is")
GRID_WS = (0.0, 1.0, 4.0)


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
    """One record per (row, w, seed): digits-FD, class accuracy, digits-IS, fidelity, NFE."""
    records = []
    for row, w, evaluation in evaluations(table):
        for seed in evaluation["seeds"]:
            path = Path(eval_file(evaluation, seed, root=str(eval_dir)))
            if not path.is_file():
                continue
            metrics = json.loads(path.read_text())
            hit = [r for r in metrics["results"] if r["steps"] == evaluation["steps"] and r.get("w") == w]
            if hit:
                records.append(dict(row=row["id"], w=w, seed=seed, nfe=hit[0]["nfe"], steps=evaluation["steps"],
                                    sampler=evaluation["sampler"], **{m: hit[0][m] for m in METRICS},
                                    fidelity_rmse=hit[0]["fidelity_rmse"], noise_floor=metrics["digits_fd_noise_floor"],
                                    samples=metrics["samples"]))
    return pd.DataFrame.from_records(records, columns=["row", "w", "seed", "nfe", "steps", "sampler", *METRICS,
                                                       "fidelity_rmse", "noise_floor", "samples"])


def summarise(records):
    """Mean, std and count over seeds per (row, w)."""
    if records.empty:
        return pd.DataFrame(columns=["row", "w", "nfe", "steps", "sampler", "n", "fidelity_rmse"]
                            + [f"{m}_{s}" for m in METRICS for s in ("mean", "std")])
    g = records.groupby(["row", "w"], sort=False)
    out = g.agg(nfe=("nfe", "first"), steps=("steps", "first"), sampler=("sampler", "first"), n=("digits_fd", "count"),
                fidelity_rmse=("fidelity_rmse", "mean"))
    for m in METRICS:
        out[f"{m}_mean"], out[f"{m}_std"] = g[m].mean(), g[m].std(ddof=1)
    return out.reset_index()


def claims(table, summary):
    """The paper's claims at every w: ``pairs`` (a lower digits-FD than b) and ``comparable`` (a ≤ factor × b)."""
    fd = {(r.row, r.w): r.digits_fd_mean for r in summary.itertuples()}
    ws = sorted(set(summary.w)) if not summary.empty else []
    ordering = table["ordering"]
    out = []
    for a, b in ordering.get("pairs", []):
        for w in ws:
            holds = bool(fd[a, w] < fd[b, w]) if (a, w) in fd and (b, w) in fd else None
            out.append(dict(kind="better", better=a, worse=b, w=w, holds=holds))
    comparable = ordering.get("comparable") or {}
    for a, b in comparable.get("pairs", []):
        for w in ws:
            holds = bool(fd[a, w] <= comparable["factor"] * fd[b, w]) if (a, w) in fd and (b, w) in fd else None
            out.append(dict(kind="comparable", better=a, worse=b, w=w, holds=holds, factor=comparable["factor"]))
    return out


def _cell(mean, std, n, digits=2):
    if pd.isna(mean):
        return ""
    return f"{mean:.{digits}f}" if n < 2 or pd.isna(std) else f"{mean:.{digits}f} ± {std:.{digits}f}"


def _matrix(table, summary, metric, digits):
    ws = sorted(set(summary.w))
    by = {(r.row, r.w): r for r in summary.itertuples()}
    lines = []
    for row in table["rows"]:
        cells = [by.get((row["id"], w)) for w in ws]
        first = next((c for c in cells if c is not None), None)
        if first is None:
            continue
        p = row.get("paper") or {}
        paper = "" if p.get("value") is None else f"{p['value']} ({p.get('confidence')})"
        lines.append([row["label"], first.sampler, first.nfe, paper if metric == "digits_fd" else "",
                      *["" if c is None else _cell(getattr(c, f"{metric}_mean"), getattr(c, f"{metric}_std"), c.n, digits)
                        for c in cells]])
    headers = ["row", "sampler", "NFE", "paper (ImageNet 64 FID)" if metric == "digits_fd" else "", *[f"w = {w:g}" for w in ws]]
    if metric != "digits_fd":
        headers, lines = headers[:3] + headers[4:], [line[:3] + line[4:] for line in lines]
    return tabulate(lines, headers=headers, tablefmt="github")


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
    for metric, title, digits in (("digits_fd", "digits-FD (lower is better)", 2),
                                  ("class_accuracy", "Class accuracy (the classifier's class is the one asked for)", 3),
                                  ("digits_is", "Digits Inception Score (classifier-based; 10 is its maximum)", 2)):
        out += [f"## {title}\n", _matrix(table, summary, metric, digits), ""]
    out.append("## The paper's claims, checked at every w\n")
    for kind in ("comparable", "better"):
        rows = {}
        for c in (c for c in checks if c["kind"] == kind):
            rows.setdefault((c["better"], c["worse"]), []).append(c)
        for (a, b), cs in rows.items():
            marks = ", ".join(f"w {c['w']:g} " + ("✓" if c["holds"] else "✗" if c["holds"] is False else "?") for c in cs)
            relation = f"≤ {cs[0]['factor']}× digits-FD of" if kind == "comparable" else "has a lower digits-FD than"
            out.append(f"- {labels[a]} {relation} {labels[b]}: {marks}")
    held = [c for c in checks if c["holds"] is not None]
    out += ["", f"{sum(c['holds'] for c in held)} of {len(held)} checks hold (✓ holds, ✗ does not, ? not measured).", ""]
    for row in table["rows"]:  # rows evaluated at fewer guidance weights than the table's, and why
        if (row.get("digits") or {}).get("w") is not None:
            out.append(f"{row['label']}: evaluated at w = {', '.join(f'{w:g}' for w in row['digits']['w'])} only. "
                       f"{(row.get('paper') or {}).get('note') or ''}")
    out.append("")
    floor, samples = summary.attrs.get("noise_floor"), summary.attrs.get("samples")
    if floor is not None:
        out.append(f"digits-FD noise floor (two halves of the real set): {floor:.2f}; {samples} samples per evaluation, "
                   "one seed each, labels drawn per seed. Pictures: `results/digits/guided.png` (digits-FD against class "
                   "accuracy and against w), `results/digits/guided_grids.png` (one row per class at w = 0, 1, 4). Paper values: "
                   "`guided-notes.md` §1a (S: a reliable secondary source); every other published guided number is unknown "
                   "here. Regenerate with `dvc repro digits_guided`.")
    return "\n".join(out) + "\n"


def plot(table, summary, path):
    """One panel per step count, one curve per row over w: digits-FD against class accuracy (Meng et al.'s FID/IS
    figure at digits scale; top), and digits-FD against w (bottom, where the accuracy saturates)."""
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
            lines.append([row["label"], paper if metric == "fid" else "", *shown])
        out += [f"## {title}\n", tabulate(lines, headers=["row", "paper" if metric == "fid" else "",
                                                          *[f"w = {w:g}" for w in ws]], tablefmt="github"), ""]
    if frame.empty:
        out.append("Nothing measured at paper scale yet: `dvc repro " + table["table"] + "` on a cluster with the data "
                   "(README, Paper scale).")
    else:
        used = "; ".join(f"FID protocol {p}: {protocols.get(p).description}" for p in sorted(set(frame["protocol"])))
        out.append(f"FID (the protocol's headline: the mean, or EDM's best range) ± std and IS mean ± std over 3 seed "
                   f"ranges of {int(frame.samples_per_range.iloc[0]):,} samples ({used}; IS over 10 splits of each "
                   f"range); {len(frame)} of the table's cells measured.")
    out.append("Paper values: `guided-notes.md` (S: reliable secondary source); unknown cells say so in "
               f"`experiments/{table['table']}.yaml`. Regenerate with `dvc repro {table['table']}`.")
    return "\n".join(out) + "\n"
