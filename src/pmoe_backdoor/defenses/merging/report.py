"""The merging study's table (the paper's layout: victim set x clean accuracy / ASR per method) and a figure of
the MSD strategies (each module slot coloured by the model it is taken from)."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

from ...io import read_json
from ...reporting.tables import HtmlLayout, pm, write_csv, write_table
from .search import load_strategy

METHODS = ("victims", "WAG", "MSD (oracle)", "MSD (selected)")


def merging_rows(record: dict) -> list[dict]:
    """One row per method of one (set, seed, coupling) result: clean accuracy and mean ASR over the set's triggers."""
    models = record["models"]
    picks = {"victims": list(record["victims"]), "WAG": ["WAG"], "MSD (oracle)": [record["oracle"]],
             "MSD (selected)": [record["chosen"]]}
    rows = []
    for method, names in picks.items():
        rows.append({**{k: record[k] for k in ("dataset", "model", "set", "seed", "coupling")}, "method": method,
                     "ba": float(np.mean([models[n]["ba"] for n in names])),
                     "asr": float(np.mean([models[n]["mean_asr"] for n in names])),
                     "selected_is_oracle": record["selected_is_oracle"],
                     "suspect_class": record["selection"]["suspect_class"]})
    return rows


def merging_table(paths: Sequence[str], target: int, out_csv: str, out_md: str, out_tex: str,
                  out_html: str | None = None) -> pd.DataFrame:
    df = pd.DataFrame([row for p in paths for row in merging_rows(read_json(p))])
    keys = ["dataset", "model", "set", "coupling", "method"]
    summary = df.groupby(keys, sort=False).agg(
        seeds=("seed", "count"), ba_mean=("ba", "mean"), ba_std=("ba", "std"), asr_mean=("asr", "mean"),
        asr_std=("asr", "std"), selected_is_oracle=("selected_is_oracle", "mean"),
        suspect_is_target=("suspect_class", lambda c: float(np.mean(np.asarray(c) == target)))).reset_index()
    write_csv(summary, out_csv)
    header = ["Dataset", "Victims", "Routers/experts", "Seeds"] + [f"{m} {v}" for m in METHODS for v in ("CACC", "ASR")]
    header += ["selected = oracle", "suspect = target"]
    body = []
    for key, g in summary.groupby(["dataset", "set", "coupling"], sort=False):
        by = {r["method"]: r for r in g.to_dict("records")}
        cells = [pm(by[m]["ba_mean"], by[m]["ba_std"]) if m in by else "–" for m in METHODS]
        asrs = [pm(by[m]["asr_mean"], by[m]["asr_std"]) if m in by else "–" for m in METHODS]
        first = g.iloc[0]
        body.append([key[0], key[1], key[2], str(int(first.seeds))]
                    + [c for pair in zip(cells, asrs) for c in pair]
                    + [f"{100 * first.selected_is_oracle:.0f} %", f"{100 * first.suspect_is_target:.0f} %"])
    title = ("Merging defenses: clean accuracy (CACC) and ASR (%) on the test images not held out, mean ± std over "
             "seeds; victims: the mean over the set's fine-tuned models; ASR: the mean over the set's triggers; "
             "MSD (oracle): the candidate with the lowest ASR; MSD (selected): the defender's choice; "
             "selected = oracle: its ASR is the lowest")
    labels = header[:4] + [(m, v) for m in METHODS for v in ("CACC", "ASR")] + header[-2:]
    write_table(header, body, title, out_md, out_tex, out_html, HtmlLayout(header=labels))
    return summary


DEFENDED = ("WAG", "MSD (selected)")


def merged_defense_rows(record: dict) -> list[dict]:
    """One row per defended model and condition of one (set, seed, coupling) result (defend_merged): each
    deployment precision, then per prune rate after pruning and after fine-tuning."""
    ident = {k: record[k] for k in ("dataset", "model", "set", "seed", "coupling")}
    rows = []
    for method, result in record["models"].items():
        conditions = list(result["precisions"].items())
        for fp in result["fine_pruning"]:
            rate = f"{fp['prune_rate']:g} %"
            conditions += [(f"pruned {rate}", fp["after_pruning"]), (f"fine-pruned {rate}", fp["after_finetuning"])]
        rows += [{**ident, "method": method, "condition": cond, "ba": r["ba"], "asr": r["mean_asr"]}
                 for cond, r in conditions]
    return rows


def merged_defense_table(paths: Sequence[str], out_csv: str, out_md: str, out_tex: str,
                         out_html: str | None = None) -> pd.DataFrame:
    """Per victim set, coupling and condition (precision, or Fine-Pruning stage and rate): CACC and ASR of WAG and
    of the selected MSD candidate, mean ± std over seeds."""
    records = [read_json(p) for p in paths]
    if not records:
        raise ValueError("merged_defense_table: no defend_merged results given")
    df = pd.DataFrame([row for r in records for row in merged_defense_rows(r)])
    keys = ["dataset", "model", "set", "coupling", "condition", "method"]
    summary = df.groupby(keys, sort=False).agg(seeds=("seed", "count"), ba_mean=("ba", "mean"), ba_std=("ba", "std"),
                                               asr_mean=("asr", "mean"), asr_std=("asr", "std")).reset_index()
    write_csv(summary, out_csv)
    header = ["Dataset", "Victims", "Routers/experts", "Condition", "Seeds"]
    header += [f"{m} {v}" for m in DEFENDED for v in ("CACC", "ASR")]
    body = []
    for key, g in summary.groupby(["dataset", "set", "coupling", "condition"], sort=False):
        by = {r["method"]: r for r in g.to_dict("records")}
        cells = [pm(by[m][f"{v}_mean"], by[m][f"{v}_std"]) if m in by else "–" for m in DEFENDED for v in ("ba", "asr")]
        body.append([*key, str(int(g.seeds.max()))] + cells)
    fp = records[0]["fine_pruning"]
    title = ("Merging defenses, deployed and Fine-Pruned: clean accuracy (CACC) and ASR (%, the mean over the set's "
             "triggers) of the WAG model and of the selected MSD candidate on the test images not held out, mean ± "
             "std over seeds; int8 / int4: simulated post-training quantization; pruned / fine-pruned r %: the "
             f"lowest r % of each expert's channels zeroed, then fine-tuned on the {fp['images']} held-out clean "
             "images only")
    if "skipped" in fp:  # a merging model without expert channels is only deployed
        title = title.replace(", deployed and Fine-Pruned:", ", deployed:").split("; pruned / fine-pruned")[0]
        title += f"; not Fine-Pruned: {fp['skipped']}"
    labels = header[:5] + [(m, v) for m in DEFENDED for v in ("CACC", "ASR")]
    write_table(header, body, title, out_md, out_tex, out_html, HtmlLayout(header=labels))
    return summary


def strategy_figure(strategy_paths: Sequence[str], labels: Sequence[str], out_png: str) -> None:
    """One row per strategy, one cell per slot, coloured by source model."""
    from ...reporting.figures import _plt, _savefig

    plt = _plt()
    strategies = [load_strategy(p) for p in strategy_paths]
    architectures = sorted({s.architecture for s in strategies})
    if len(architectures) > 1:  # one row of slot labels serves one architecture only
        raise ValueError(f"strategy_figure: the strategies are for different architectures {architectures}")
    names = strategies[0].table.names if strategies else ()
    grid = np.array([s.assignment for s in strategies], dtype=float)
    fig, ax = plt.subplots(figsize=(max(11.0, 2.5 + 0.5 * len(names)), 0.6 + 0.55 * len(strategies)),
                           layout="constrained")
    n_max = int(grid.max()) + 1 if grid.size else 1
    cmap = plt.get_cmap("tab10", max(n_max, 2))
    ax.imshow(grid, cmap=cmap, vmin=-0.5, vmax=max(n_max, 2) - 0.5, aspect="auto")
    for i, s in enumerate(strategies):
        for j, src in enumerate(s.assignment):
            ax.text(j, i, str(src), ha="center", va="center", color="white", fontsize=9)
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(strategies)), [f"{lab} (F = {s.fitness:.2f})" for lab, s in zip(labels, strategies)],
                  fontsize=8)
    arch = f" ({architectures[0]})" if architectures and architectures[0] != "pmoe" else ""
    ax.set_title(f"MSD strategies{arch}: the source model of each module slot", fontsize=10)
    _savefig(fig, out_png)
    plt.close(fig)
