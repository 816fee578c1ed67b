"""The pictures of a guided table: digits-FD against class accuracy and w (``<table>.png``), precision against
recall over w (``<table>_pr.png``) and per-class sample grids at w = 0, 1, 4 or the table's ``digits.grid_w``
(``<table>_grids.png``)."""
from pathlib import Path

import matplotlib

from tract_repro.common.files import write_atomic
from tract_repro.results.experiments import eval_file
from tract_repro.results.guided_table import EVAL_DIR, evaluations, grid_ws

matplotlib.use("Agg")
import matplotlib.image as mpimg  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402


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
    """Class grids (one row per class) of seed 0, one panel per (row, w) for w = 0, 1, 4 (or ``digits.grid_w``)."""
    ws = grid_ws(table)
    labels = {r["id"]: r["label"] for r in table["rows"]}
    found = {(row["id"], w): ev for row, w, ev in evaluations(table)}
    rows = [r for r in rows if any((r, w) in found for w in ws)]
    if not rows:
        return False
    fig, axes = plt.subplots(len(rows), len(ws), figsize=(2.2 * len(ws), 2.3 * len(rows)), squeeze=False)
    for i, row in enumerate(rows):
        for j, w in enumerate(ws):
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
