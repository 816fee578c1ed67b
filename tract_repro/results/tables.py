"""Render results/<table>.md: our numbers beside the paper's, with the paper's orderings checked.

    python -m tract_repro.results.tables table1                 # after the digits pipeline has evaluated its rows
    python -m tract_repro.results.tables table1 --paper-scale   # after the paper-scale evaluations

Digits mode also writes results/digits/<table>.json (DVC metrics), .csv (DVC plots) and .png.
Paper-scale mode writes results/paper/<table>.json (the "ours, paper scale" column: FID mean ± std
over the seed ranges, per row) and re-renders results/<table>.md with both columns; either mode
picks up the other's latest numbers, so the two stages may run in any order.
"""
from tract_repro.common.errors import ConfigError
from tract_repro.launching import warm

warm.forward(__name__, __spec__)  # under `python -m tract_repro.warm`: run in its warm server, not here

import json
import sys
import textwrap
from pathlib import Path

import matplotlib
import pandas as pd
from tabulate import tabulate

from tract_repro.common.cli import command
from tract_repro.common.files import write_atomic, write_json, write_text
from tract_repro.evaluation import protocols
from tract_repro.results.experiments import PAPER_EVAL, eval_file, load_tables, load_yaml, paper_eval_file, read_evaluations
from tract_repro.common.lengths import parse_samples

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

EVAL_DIR = Path("results/digits/eval")


def digits_scores(table, eval_dir=EVAL_DIR):
    """One record per (row, seed) with the row's metric at its step count and sampler."""
    records = []
    for row in table["rows"]:
        evaluation = _evaluation_of(table["table"], row["id"])
        if evaluation is None:
            continue
        for seed in evaluation["seeds"]:
            path = Path(eval_file(evaluation, seed, root=str(eval_dir)))
            if not path.is_file():
                continue
            metrics = json.loads(path.read_text())
            hit = [r for r in metrics["results"] if r["steps"] == evaluation["steps"]]
            if hit:
                records.append(dict(row=row["id"], seed=seed, nfe=hit[0]["nfe"], digits_fd=hit[0]["digits_fd"],
                                    fidelity_rmse=hit[0]["fidelity_rmse"], noise_floor=metrics["digits_fd_noise_floor"],
                                    samples=metrics["samples"],
                                    reconstruction_floor=metrics.get("digits_fd_reconstruction_floor", float("nan"))))
    return pd.DataFrame.from_records(records, columns=["row", "seed", "nfe", "digits_fd", "fidelity_rmse",
                                                       "noise_floor", "samples", "reconstruction_floor"])


def training_curves(table, runs_root="runs/digits", evaluation_of=None):
    """Loss against samples for every (row, seed), following each run's chain of phases back to its start.
    ``evaluation_of(row id)``: what the row evaluates (default: its entry in pipelines/evaluations.json)."""
    evaluation_of = evaluation_of or (lambda row_id: _evaluation_of(table["table"], row_id))
    records = []
    for row in table["rows"]:
        evaluation = evaluation_of(row["id"])
        if evaluation is None or evaluation["target"] == evaluation["teacher"]:
            continue
        for seed in evaluation["seeds"]:
            run = Path(runs_root) / evaluation["target"] / f"s{seed}"
            while run is not None and (run / "metrics.jsonl").is_file():
                for line in (run / "metrics.jsonl").read_text().splitlines():
                    r = json.loads(line)
                    records.append(dict(row=row["id"], seed=seed, samples=r["samples"], phase=r["phase"], loss=r["loss"]))
                previous = json.loads((run / "run.json").read_text()).get("previous")
                run = Path(previous) if previous else None
    curves = pd.DataFrame.from_records(records, columns=["row", "seed", "samples", "phase", "loss"])
    return curves.drop_duplicates(["row", "seed", "samples"]).sort_values(["row", "seed", "samples"])


def plot_curves(table, curves, path):
    """One line per row (mean loss over seeds) against training samples; phases restart the loss scale."""
    labels = {r["id"]: r["label"] for r in table["rows"]}
    fig, ax = plt.subplots(figsize=(7, 4))
    for row, group in curves.groupby("row", sort=False):
        mean = group.groupby("samples").loss.mean()
        ax.plot(mean.index, mean.values, label=labels[row], lw=1)
    ax.set_xlabel("training samples")
    ax.set_ylabel("weighted loss (mean over seeds)")
    ax.set_yscale("log")
    ax.legend(fontsize=6)
    ax.set_title(f"{table['title']}: training curves", fontsize=8)
    fig.tight_layout()
    write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=120))
    plt.close(fig)


def _evaluation_of(table_name, row_id):
    """What a row evaluates (the expansion that wrote dvc.yaml, saved beside it), or None for rows without a digits run."""
    return read_evaluations("digits").get(table_name, {}).get(row_id)


def _paper_evaluation_of(table_name, row_id):
    """What a row evaluates at paper scale (the expansion that wrote dvc.yaml), or None."""
    return read_evaluations("paper").get(table_name, {}).get(row_id)


def paper_scores(table, eval_dir=PAPER_EVAL):
    """{row id: its paper-scale FID (mean, std, per range) and how it was measured} for the rows evaluated so far."""
    out = {}
    for row in table["rows"]:
        evaluation = _paper_evaluation_of(table["table"], row["id"]) if row.get("paper_scale") else None
        path = Path(paper_eval_file(evaluation, root=str(eval_dir))) if evaluation else None
        if path is None or not path.is_file():
            continue
        metrics = json.loads(path.read_text())
        hit = [r for r in metrics["results"] if r["steps"] == evaluation["steps"]]
        if hit:
            r = hit[0]
            spec = protocols.of_metadata(r) or protocols.get(protocols.DEFAULT)
            out[row["id"]] = dict(fid_mean=r["fid_mean"], fid_std=r["fid_std"], fid=r["fid"], fid_min=min(r["fid"]),
                                  fid_headline=spec.headline(r["fid"]), steps=r["steps"], nfe=r["nfe"],
                                  sampler=r["sampler"], protocol=spec.name, samples_per_range=r["samples_per_range"],
                                  seed_ranges=r["seed_ranges"], reference_sha256=r["reference_sha256"],
                                  run=metrics["run"], weights_sha256=metrics["weights_sha256"])
            if r.get("clip_mean") is not None:  # a text-to-image row: the CLIP score of the same samples
                out[row["id"]].update(clip_mean=r["clip_mean"], clip_model=metrics["clip"]["model"]["folder"])
    return out


def paper_orderings(table, scores):
    """For each claimed pair (a better than b) at paper scale: True, False, or None when either is missing."""
    return [dict(better=a, worse=b, holds=bool(scores[a]["fid_headline"] < scores[b]["fid_headline"])
                 if a in scores and b in scores else None) for a, b in table["ordering"]["pairs"]]


def _fmt_paper(value):
    if isinstance(value, dict):
        std = f" ± {value['fid_std']:.2f}" if value.get("fid_std") is not None else ""
        clip = f"; CLIP {value['clip_mean']:.2f}" if value.get("clip_mean") is not None else ""
        if protocols.get(value["protocol"]).best_of_ranges:  # EDM's headline: the best range, mean ± std beside it
            return f"{value['fid_min']:.2f} best, {value['fid_mean']:.2f}{std} ({value['protocol']}{clip})"
        return f"{value['fid_mean']:.2f}{std} ({value['protocol']}{clip})"
    return f"{value:.2f}"


def summarise(scores):
    """mean ± std over seeds per row."""
    if scores.empty:
        return pd.DataFrame(columns=["row", "nfe", "fd_mean", "fd_std", "n", "rmse_mean"]).set_index("row")
    g = scores.groupby("row")
    return pd.DataFrame({"nfe": g.nfe.first(), "fd_mean": g.digits_fd.mean(), "fd_std": g.digits_fd.std(ddof=1),
                         "n": g.digits_fd.count(), "rmse_mean": g.fidelity_rmse.mean()})


def check_orderings(table, summary):
    """For each claimed pair (a better than b): True, False, or None when either side is missing."""
    out = []
    for a, b in table["ordering"]["pairs"]:
        holds = None
        if a in summary.index and b in summary.index:
            holds = bool(summary.loc[a, "fd_mean"] < summary.loc[b, "fd_mean"])
        out.append(dict(better=a, worse=b, holds=holds))
    return out


def _fmt(mean, std, n):
    if pd.isna(mean):
        return ""
    return f"{mean:.2f}" if n < 2 or pd.isna(std) else f"{mean:.2f} ± {std:.2f} (n={n})"


def render(table, summary, orderings, paper_scale=None, paper_order=None):
    """The Markdown table: row, paper value (confidence), ours at paper scale, ours at digits scale, ordering."""
    labels = {r["id"]: r["label"] for r in table["rows"]}
    digits_scale = bool(table["digits"].get("metric"))  # a paper-only table (sd15) has no digits columns
    if not digits_scale:
        orderings = paper_order or [dict(better=a, worse=b, holds=None) for a, b in table["ordering"]["pairs"]]
    lines, rows = [], []
    for row in table["rows"]:
        p = row.get("paper") or {}
        paper = "" if p.get("value") is None else f"{p['value']} ({p.get('confidence')}; {p.get('source')})"
        ours_paper = "" if not paper_scale or row["id"] not in paper_scale else _fmt_paper(paper_scale[row["id"]])
        digits = "n/a" if not row.get("digits") else ""
        if row["id"] in summary.index:
            s = summary.loc[row["id"]]
            digits = _fmt(s.fd_mean, s.fd_std, int(s.n))
        marks = [("✓" if o["holds"] else "✗" if o["holds"] is False else "?") + f" < {labels[o['worse']]}"
                 for o in orderings if o["better"] == row["id"]]
        rows.append([row["label"], paper, ours_paper, digits, "; ".join(marks)] if digits_scale
                    else [row["label"], paper, ours_paper, "; ".join(marks)])
    metric = table["digits"].get("metric") or "—"
    headers = ["row", f"paper: {table['paper']['metric']}", "ours, paper scale", f"ours, digits scale ({metric})",
               "paper's ordering at digits scale"] if digits_scale else \
        ["row", f"paper: {table['paper']['metric']}", "ours, paper scale", "claimed ordering at paper scale"]
    lines.append(f"# {table['title']}\n")
    lines.append(f"Paper setting: {table['paper']['setting']}.  \nPaper claim: {table['ordering']['claim']}.\n")
    lines.append(tabulate(rows, headers=headers, tablefmt="github"))
    held = [o for o in orderings if o["holds"] is not None]
    lines.append("")
    if held and digits_scale:
        lines.append(f"At digits scale {sum(o['holds'] for o in held)} of {len(held)} claimed pairwise orderings hold "
                     f"(✓ holds, ✗ reversed, ? not yet measured).")
    measured = [v for v in (paper_scale or {}).values() if isinstance(v, dict)]
    if measured:
        held_paper = [o for o in paper_order or [] if o["holds"] is not None]
        ranges = {(len(v["fid"]), v["samples_per_range"], v["protocol"]) for v in measured}
        lines.append("Paper scale: FID mean ± std over " + ", ".join(f"{n} seed ranges of {k:,} samples (FID protocol "
                                                                  f"{m}: {protocols.get(m).description})"
                                                                  for n, k, m in sorted(ranges))
                     + (", against the training-set reference statistics" if not any("clip_mean" in v for v in measured)
                        else ", against the evaluation images' reference statistics, and the CLIP score (100·max(cos, 0), "
                             "CLIP " + ", ".join(sorted({v["clip_model"] for v in measured if "clip_mean" in v})) + ")")
                     + f"; {len(measured)} rows measured"
                     + (f"; {sum(o['holds'] for o in held_paper)} of {len(held_paper)} claimed pairwise orderings hold."
                        if held_paper else "."))
    if "noise_floor" in summary.attrs:
        recon = summary.attrs.get("reconstruction_floor")  # latent runs: the autoencoder's floor (decoded reals)
        lines.append(f"digits-FD noise floor (two halves of the real set): {summary.attrs['noise_floor']:.2f}; "
                     + (f"reconstruction floor (the autoencoder's reconstructions of one half against the other): "
                        f"{recon:.2f}; " if recon is not None else "")
                     + f"{summary.attrs['samples']} samples per evaluation, one seed each; lower is better.")
    lines.append("Confidence letters and sources are those of `docs/paper-numbers.md` (P primary, S reliable secondary, "
                 "M machine-generated secondary, U uncertain). Regenerate with "
                 + ("`dvc repro digits_" + table["table"] + "` (digits scale)" if digits_scale else "")
                 + (" or " if digits_scale and any(r.get("paper_scale") for r in table["rows"]) else "")
                 + ("`dvc repro " + table["table"] + "` (paper scale)" if any(r.get("paper_scale") for r in table["rows"])
                    else "") + ".")
    return "\n".join(lines) + "\n"


def plot(table, summary, path, params=None):
    """Rows with a ``series`` and an ``x`` (a budget) → lines of the metric against x; otherwise one point per row."""
    specs = {r["id"]: r.get("digits") or {} for r in table["rows"]}
    labels = {r["id"]: r["label"] for r in table["rows"]}
    series = {specs[i].get("series") for i in summary.index} - {None}
    if series and params is not None:
        fig, ax = plt.subplots(figsize=(6, 4))
        for name in sorted(series):
            ids = [i for i in summary.index if specs[i].get("series") == name]
            xs = [parse_samples(params[specs[i]["x"].lstrip("$")]) for i in ids]
            order = sorted(range(len(ids)), key=xs.__getitem__)
            ax.errorbar([xs[k] for k in order], [summary.fd_mean[ids[k]] for k in order],
                        yerr=[summary.fd_std.fillna(0)[ids[k]] for k in order], marker="o", capsize=3, label=name)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("total training samples")
        ax.legend()
    else:
        rows = [r["id"] for r in table["rows"] if r["id"] in summary.index][::-1]  # the table's order, top down
        fig, ax = plt.subplots(figsize=(7, 0.45 * max(len(rows), 2) + 1.2))
        y = list(range(len(rows)))
        ax.errorbar(summary.fd_mean[rows], y, xerr=summary.fd_std.fillna(0)[rows], fmt="o", capsize=3)
        ax.set_yticks(y, [labels[i] for i in rows])
        ax.set_xscale("log")
    metric = f"{table['digits']['metric']} (lower is better), mean ± std over seeds"
    (ax.set_ylabel if series and params is not None else ax.set_xlabel)(metric)
    ax.set_title(textwrap.fill(table["title"], 75), fontsize=8)  # a long title wraps instead of running off
    fig.tight_layout()
    write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=120))
    plt.close(fig)


def read_paper_scale(name):
    """(scores, orderings) of results/paper/<name>.json, or (None, None) before any paper-scale evaluation."""
    path = Path("results/paper") / f"{name}.json"
    if not path.is_file():
        return None, None
    saved = json.loads(path.read_text())
    return saved.get("rows"), saved.get("orderings")


def write_guided(name, table):
    """A table evaluated at guidance weights (experiments/guided.yaml): :mod:`tract_repro.results.guided_table`."""
    from tract_repro.results import guided_plots, guided_table

    records = guided_table.scores(table)
    summary = guided_table.summarise(records)
    if not records.empty:
        summary.attrs.update(noise_floor=records.noise_floor.mean(), samples=int(records.samples.iloc[0]))
        if records.reconstruction_floor.notna().any():  # a latent table: the autoencoder's floor
            summary.attrs.update(reconstruction_floor=records.reconstruction_floor.mean())
    checks = guided_table.claims(table, summary)
    Path("results/digits").mkdir(parents=True, exist_ok=True)
    write_text(f"results/{name}.md", guided_table.render(table, summary, checks, load_yaml("params.yaml")["digits"]))
    write_text(f"results/digits/{name}.csv", summary.to_csv(index=False))
    write_json(f"results/digits/{name}.json", dict(rows=json.loads(summary.to_json(orient="records")), checks=checks))
    if not summary.empty:
        guided_plots.plot(table, summary, f"results/digits/{name}.png")
        guided_plots.plot_grids(table, f"results/digits/{name}_grids.png")
    first = {}
    for row, _, evaluation in guided_table.evaluations(table):
        first.setdefault(row["id"], evaluation)
    curves = training_curves(table, evaluation_of=first.get)
    write_text(f"results/digits/{name}_curves.csv", curves.to_csv(index=False))
    if not curves.empty:
        plot_curves(table, curves, f"results/digits/{name}_curves.png")
    print(f"results/{name}.md: {len(summary)} (row, w) cells measured, "
          f"{sum(c['holds'] is True for c in checks)}/{len(checks)} checks hold")


@command
def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    paper_mode = "--paper-scale" in argv
    argv = [a for a in argv if a != "--paper-scale"]
    tables = load_tables()
    names = argv or [n for n, t in tables.items() if (paper_mode and any(r.get("paper_scale") for r in t["rows"]))
                     or (not paper_mode and t["digits"].get("metric"))]
    for name in names:
        if name not in tables:
            raise ConfigError(f"no experiments/{name}.yaml; choose from {', '.join(tables)}")
        table = tables[name]
        if table["digits"].get("w") is not None and not paper_mode:
            write_guided(name, table)
            continue
        if (table.get("paper") or {}).get("w") is not None and paper_mode:  # guided distillation at paper scale
            from tract_repro.results import guided_paper

            records = guided_paper.paper_records(table)
            write_json(f"results/paper/{name}.json", dict(rows=records), ensure_ascii=False)
            write_text(f"results/{name}.md", guided_paper.render_paper(table, records))
            if name in guided_paper.TEXT_TO_IMAGE and any(r.get("clip_mean") is not None for r in records):
                guided_paper.plot_tradeoff(table, records, f"results/paper/{name}_tradeoff.png")
            print(f"results/{name}.md: {len(records)} (row, w) cells measured at paper scale")
            continue
        scores = digits_scores(table)
        summary = summarise(scores)
        if not scores.empty:
            summary.attrs.update(noise_floor=scores.noise_floor.mean(), samples=int(scores.samples.iloc[0]))
            if scores.reconstruction_floor.notna().any():
                summary.attrs.update(reconstruction_floor=scores.reconstruction_floor.mean())
        orderings = check_orderings(table, summary)
        if paper_mode:
            paper_scale = paper_scores(table)
            paper_order = paper_orderings(table, paper_scale)
            write_json(f"results/paper/{name}.json", dict(rows=paper_scale, orderings=paper_order), ensure_ascii=False)
            write_text(f"results/{name}.md", render(table, summary, orderings, paper_scale, paper_order))
            print(f"results/{name}.md: {len(paper_scale)} rows measured at paper scale, "
                  f"{sum(o['holds'] is True for o in paper_order)}/{len(paper_order)} orderings hold")
            continue
        paper_scale, paper_order = read_paper_scale(name)
        Path("results/digits").mkdir(parents=True, exist_ok=True)
        write_text(f"results/{name}.md", render(table, summary, orderings, paper_scale, paper_order))
        out = summary.reset_index()
        write_text(f"results/digits/{name}.csv", out.to_csv(index=False))
        write_json(f"results/digits/{name}.json", dict(rows=json.loads(out.to_json(orient="records")), orderings=orderings))
        if not summary.empty:
            plot(table, summary, f"results/digits/{name}.png", load_yaml("params.yaml")["digits"])
        curves = training_curves(table)
        write_text(f"results/digits/{name}_curves.csv", curves.to_csv(index=False))
        if not curves.empty:
            plot_curves(table, curves, f"results/digits/{name}_curves.png")
        print(f"results/{name}.md: {len(summary)} rows measured, "
              f"{sum(o['holds'] is True for o in orderings)}/{len(orderings)} orderings hold")
    return 0


if __name__ == "__main__":
    from tract_repro.launching.process import exit_now

    exit_now(main())
