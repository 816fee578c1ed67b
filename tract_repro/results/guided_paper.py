"""results/<table>.md at paper scale for a table evaluated at guidance weights (experiments/guided_{imagenet64,cifar10}.yaml):
FID and Inception Score per (row, w) beside the paper's values, with each row's training samples side by side."""
import json
from pathlib import Path

import pandas as pd
from tabulate import tabulate

from tract_repro.evaluation import protocols
from tract_repro.results.experiments import read_evaluations
from tract_repro.results.guided_table import _cell


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
                                    is_std=r.get("is_std"), clip_mean=r.get("clip_mean"), clip_std=r.get("clip_std"),
                                    samples_per_range=r["samples_per_range"],
                                    seed_ranges=r["seed_ranges"], run=metrics["run"], weights_sha256=metrics["weights_sha256"]))
    return records


#: guided tables of text-to-image models, whose rows also carry the CLIP score
TEXT_TO_IMAGE = {"guided_sd"}


def plot_tradeoff(table, records, path):
    """FID against CLIP score over w, one curve per row (model, sampler and step count), as Meng et al. plot it."""
    import matplotlib
    import matplotlib.pyplot as plt

    from tract_repro.common.files import write_atomic

    matplotlib.use("Agg")
    labels = {r["id"]: r["label"] for r in table["rows"]}
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for row in table["rows"]:
        points = sorted((r["w"], r["clip_mean"], r["fid_headline"]) for r in records
                        if r["row"] == row["id"] and r.get("clip_mean") is not None)
        if points:
            ax.plot([p[1] for p in points], [p[2] for p in points], marker="o", label=labels[row["id"]])
            for w, x, y in points:
                ax.annotate(f"{w:g}", (x, y), fontsize=6, textcoords="offset points", xytext=(3, 3))
    ax.set_xlabel("CLIP score (higher is better)")
    ax.set_ylabel("FID-30K (lower is better)")
    ax.set_title("FID against CLIP score over w (labels: w)", fontsize=8)
    ax.legend(fontsize=6)
    fig.tight_layout()
    write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=120))
    plt.close(fig)


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
                                                        "fid_headline", "is_mean", "is_std", "clip_mean", "clip_std",
                                                        "samples_per_range"])
    ws = (table.get("paper") or {}).get("w") or []
    by = {(r.row, float(r.w)): r for r in frame.itertuples()}
    out = [f"# {table['title']}\n",
           "Guidance: x̂^w = (1 + w)·x̂(x_t, c) − w·x̂(x_t, ∅), w = 0 conditional (a guidance scale s = 1 + w elsewhere); "
           "the guided teacher is counted as 2 NFE a step.\n",
           f"Paper setting: {table['paper']['setting']}.  \nPaper claim: {table['ordering']['claim']}.\n"]
    sections = [("fid", "FID (lower is better)"), ("is", "Inception Score (higher is better)")]
    if table["table"] in TEXT_TO_IMAGE:  # text-to-image: the CLIP score of the same samples and their captions
        sections.append(("clip", "CLIP score (higher is better; 100·max(cos, 0))"))
    for metric, title in sections:
        lines = []
        for row in table["rows"]:
            p = row.get("paper") or {}
            paper = "" if p.get("value") is None else f"{p['value']} ({p.get('confidence')})"
            cells = [by.get((row["id"], float(w))) for w in ws]
            head = {"fid": "fid_headline", "is": "is_mean", "clip": "clip_mean"}[metric]  # FID: the protocol's headline
            shown = [("" if c is None or pd.isna(getattr(c, head)) else
                      _cell(getattr(c, head), getattr(c, f"{metric}_std"), 2)) for c in cells]
            trained = [training_samples(row.get("paper_scale"), table)] if metric == "fid" else []
            lines.append([row["label"], *trained, paper if metric == "fid" else "", *shown])
        out += [f"## {title}\n", tabulate(lines, headers=["row", *(["training samples"] if metric == "fid" else []),
                                                          "paper" if metric == "fid" else "",
                                                          *[f"w = {w:g}" for w in ws]], tablefmt="github",
                              disable_numparse=True), ""]  # cells keep their two decimals
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
