"""Aggregation of per-run metrics into the paper's tables (CSV, Markdown, LaTeX) and figures."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from .io import atomic_path, read_json


def collect_runs(metric_paths: Sequence[str], out_csv: str) -> pd.DataFrame:
    """One row per run: dataset, model, attack, trigger, rate, seed, BA, ASR, test loss."""
    rows = []
    for p in metric_paths:
        m = read_json(p)
        trigger, rate = ("clean", 0.0) if m["attack"] == "clean" else m["attack"].rsplit("-", 1)
        rows.append({"dataset": m["dataset"], "model": m["model"], "attack": m["attack"], "trigger": trigger,
                     "rate": float(rate), "seed": m["seed"], "ba": m["ba"], "asr": m.get("asr", np.nan),
                     "test_loss": m["test_loss"], "path": str(p)})
    df = pd.DataFrame(rows)
    with atomic_path(out_csv) as tmp:
        df.to_csv(tmp, index=False)
    return df


def _std(x: pd.Series) -> float:
    return float(x.std(ddof=1)) if len(x) > 1 else float("nan")


def summarise_attacks(runs: pd.DataFrame, paper: pd.DataFrame | None, dataset: str, paper_name: str) -> pd.DataFrame:
    """Mean and std over seeds of ASR, BA and CAD (against the mean clean accuracy of the same dataset and
    model), beside the paper's values and the difference."""
    df = runs[runs.dataset == dataset]
    clean = df[df.attack == "clean"].groupby("model").ba.mean()
    rows = []
    for (model, trigger, rate), g in df.groupby(["model", "trigger", "rate"], sort=True):
        ca = clean.get(model, np.nan)
        row = {"dataset": dataset, "model": model, "trigger": trigger, "rate": rate, "seeds": len(g),
               "asr_mean": g.asr.mean(), "asr_std": _std(g.asr), "ba_mean": g.ba.mean(), "ba_std": _std(g.ba),
               "cad_mean": ca - g.ba.mean() if trigger != "clean" else np.nan,
               "cad_std": _std(g.ba) if trigger != "clean" else np.nan}
        if paper is not None and trigger != "clean":
            hit = paper[(paper.dataset == paper_name) & (paper.trigger == trigger)
                        & np.isclose(paper.poison_rate_percent, rate)]
            for metric in ("asr", "ba", "cad"):
                value = float(hit[metric].iloc[0]) if len(hit) else np.nan
                row[f"paper_{metric}"] = value
                row[f"diff_{metric}"] = row[f"{metric}_mean"] - value
        rows.append(row)
    out = pd.DataFrame(rows)
    if len(out):
        out["_order"] = (out.trigger != "clean").astype(int)
        out = out.sort_values(["model", "_order", "trigger", "rate"]).drop(columns="_order")
    return out.reset_index(drop=True)


def _pm(mean: float, std: float, digits: int = 1) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "–"
    s = f"{mean:.{digits}f}"
    return s if std is None or math.isnan(std) else f"{s} ± {std:.{digits}f}"


def _num(x: float, digits: int = 1, signed: bool = False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:+.{digits}f}" if signed else f"{x:.{digits}f}"


def write_markdown(path: str, header: list[str], rows: list[list[str]], title: str = "") -> None:
    lines = ([f"**{title}**", ""] if title else []) + ["| " + " | ".join(header) + " |",
                                                        "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n")


def _tex_escape(s: str) -> str:
    return s.replace("\\", "\\textbackslash{}").replace("%", "\\%").replace("_", "\\_").replace("&", "\\&") \
        .replace("±", "$\\pm$").replace("–", "--").replace("Δ", "$\\Delta$")


def write_latex(path: str, header: list[str], rows: list[list[str]], caption: str) -> None:
    lines = ["\\begin{table}[t]", "\\centering", f"\\caption{{{_tex_escape(caption)}}}",
             "\\begin{tabular}{" + "l" * 2 + "r" * (len(header) - 2) + "}", "\\toprule",
             " & ".join(_tex_escape(h) for h in header) + " \\\\", "\\midrule"]
    lines += [" & ".join(_tex_escape(c) for c in r) + " \\\\" for r in rows]
    lines += ["\\bottomrule", "\\end{tabular}", "\\end{table}"]
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n")


def attack_table(runs_csv: str, paper_csv: str | None, dataset: str, paper_name: str, out_csv: str, out_md: str,
                 out_tex: str) -> pd.DataFrame:
    runs = pd.read_csv(runs_csv)
    paper = pd.read_csv(paper_csv) if paper_csv and Path(paper_csv).is_file() else None
    table = summarise_attacks(runs, paper, dataset, paper_name)
    with atomic_path(out_csv) as tmp:
        table.to_csv(tmp, index=False)
    header = ["Model", "Trigger", "Rate %", "Seeds", "ASR %", "paper", "Δ", "BA %", "paper", "Δ", "CAD", "paper", "Δ"]
    rows = []
    for r in table.itertuples():
        clean = r.trigger == "clean"
        rows.append([r.model, r.trigger, "–" if clean else f"{r.rate:g}", str(r.seeds),
                     _pm(r.asr_mean, r.asr_std), _num(getattr(r, "paper_asr", np.nan)),
                     _num(getattr(r, "diff_asr", np.nan), signed=True),
                     _pm(r.ba_mean, r.ba_std), _num(getattr(r, "paper_ba", np.nan)),
                     _num(getattr(r, "diff_ba", np.nan), signed=True),
                     _pm(r.cad_mean, r.cad_std), _num(getattr(r, "paper_cad", np.nan)),
                     _num(getattr(r, "diff_cad", np.nan), signed=True)])
    title = (f"{dataset}: attack success rate (ASR), benign accuracy (BA) and clean accuracy drop (CAD), mean ± std "
             f"over seeds; paper values for {paper_name}; the clean row's BA is the clean accuracy (CA)")
    write_markdown(out_md, header, rows, title)
    write_latex(out_tex, header, rows, title)
    return table


def _savefig(fig, path: str) -> None:
    with atomic_path(path, suffix=Path(path).suffix) as tmp:
        fig.savefig(tmp, dpi=130, bbox_inches="tight", format=Path(path).suffix.lstrip("."))


def attack_figure(runs_csvs: Sequence[str], paper_csv: str | None, paper_names: dict[str, str], out_png: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    runs = pd.concat([pd.read_csv(p) for p in runs_csvs], ignore_index=True)
    paper = pd.read_csv(paper_csv) if paper_csv and Path(paper_csv).is_file() else None
    attacks = runs[runs.trigger != "clean"]
    datasets, triggers = sorted(runs.dataset.unique()), sorted(attacks.trigger.unique())
    sns.set_theme(style="whitegrid", context="notebook")
    fig, axes = plt.subplots(len(datasets), max(len(triggers), 1), squeeze=False,
                             figsize=(4.2 * max(len(triggers), 1), 3.4 * len(datasets)), sharey=True)
    palette = sns.color_palette("deep")
    for i, ds in enumerate(datasets):
        for j, trig in enumerate(triggers):
            ax = axes[i, j]
            sub = attacks[(attacks.dataset == ds) & (attacks.trigger == trig)]
            for k, (model, g) in enumerate(sub.groupby("model")):
                stats = g.groupby("rate").agg(asr=("asr", "mean"), asr_sd=("asr", "std"),
                                              ba=("ba", "mean"), ba_sd=("ba", "std")).reset_index()
                ax.errorbar(stats.rate, stats.asr, yerr=stats.asr_sd.fillna(0), marker="o", color=palette[k],
                            label=f"{model} ASR", capsize=3)
                ax.errorbar(stats.rate, stats.ba, yerr=stats.ba_sd.fillna(0), marker="s", ls="--",
                            color=palette[k], label=f"{model} BA", capsize=3, alpha=0.8)
            if paper is not None:
                pp = paper[(paper.dataset == paper_names.get(ds, ds)) & (paper.trigger == trig)]
                if len(pp):
                    ax.plot(pp.poison_rate_percent, pp.asr, "k^", mfc="none", label="paper ASR")
                    ax.plot(pp.poison_rate_percent, pp.ba, "kv", mfc="none", label="paper BA")
            ax.set_xscale("log")
            ax.set_title(f"{ds} · {trig}")
            ax.set_xlabel("poisoning rate (% of training set, log scale)")
            if j == 0:
                ax.set_ylabel("%")
            ax.set_ylim(-3, 103)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 6),
               bbox_to_anchor=(0.5, -0.02 - 0.03 * len(datasets)))
    fig.tight_layout()
    _savefig(fig, out_png)
    plt.close(fig)


def fine_pruning_table(metric_paths: Sequence[str], out_csv: str, out_md: str, out_tex: str,
                       paper_csv: str | None = None, paper_names: dict[str, str] | None = None) -> pd.DataFrame:
    """Table 3: CA and ASR before the defense, after pruning and after fine-tuning, mean ± std over runs,
    with the paper's values (where its garbled Table 3 lets them be recovered) in brackets."""
    rows = []
    for p in metric_paths:
        m = read_json(p)
        row = {k: m[k] for k in ("dataset", "model", "attack", "seed", "prune_rate", "finetune_data", "mask")}
        for stage in ("before", "after_pruning", "after_finetuning"):
            row[f"{stage}_ca"], row[f"{stage}_asr"] = m[stage]["ca"], m[stage]["asr"]
        rows.append(row)
    df = pd.DataFrame(rows)
    keys = ["dataset", "model", "attack", "finetune_data", "mask", "prune_rate"]
    values = [c for c in df.columns if c.startswith(("before", "after"))]
    summary = df.groupby(keys).agg(runs=("seed", "count"), **{f"{c}_mean": (c, "mean") for c in values},
                                   **{f"{c}_std": (c, "std") for c in values}).reset_index()
    stages = [f"{s}_{m}" for s in ("before", "after_pruning", "after_finetuning") for m in ("ca", "asr")]
    paper = pd.read_csv(paper_csv) if paper_csv and Path(paper_csv).is_file() else None
    for col in stages:
        summary[f"paper_{col}"] = np.nan
    if paper is not None:
        for i, r in summary.iterrows():
            trigger, rate = r["attack"].rsplit("-", 1)
            hit = paper[(paper.dataset == (paper_names or {}).get(r["dataset"], r["dataset"]))
                        & (paper.trigger == trigger) & np.isclose(paper.poison_rate_percent, float(rate))
                        & np.isclose(paper.prune_rate, r["prune_rate"])]
            if len(hit):
                for col in stages:
                    summary.loc[i, f"paper_{col}"] = hit[col].iloc[0]
    with atomic_path(out_csv) as tmp:
        summary.to_csv(tmp, index=False)
    header = ["Dataset", "Model", "Attack", "Fine-tune data", "Pruned %", "Runs", "CA before", "ASR before",
              "CA pruned", "ASR pruned", "CA fine-tuned", "ASR fine-tuned"]
    body = []
    for r in summary.to_dict("records"):
        cells = []
        for col in stages:
            cell = _pm(r[f"{col}_mean"], r[f"{col}_std"])
            if not math.isnan(r[f"paper_{col}"]):
                cell += f" [{r[f'paper_{col}']:.1f}]"
            cells.append(cell)
        body.append([r["dataset"], r["model"], r["attack"], r["finetune_data"] + (" (masked)" if r["mask"] else ""),
                     f"{r['prune_rate']:g}", str(r["runs"])] + cells)
    title = ("Fine-Pruning of the experts' layers: clean accuracy (CA) and ASR in %, mean ± std over runs; "
             "[the paper's value] where its Table 3 can be recovered")
    write_markdown(out_md, header, body, title)
    write_latex(out_tex, header, body, title)
    return summary


def prune_sweep_figure(sweep_paths: Sequence[str], out_png: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    df = pd.DataFrame([row for p in sweep_paths for row in read_json(p)])
    sns.set_theme(style="whitegrid", context="notebook")
    groups = list(df.groupby(["dataset", "model", "attack"]))
    fig, axes = plt.subplots(1, len(groups), squeeze=False, figsize=(5 * len(groups), 3.6))
    for ax, ((ds, model, attack), g) in zip(axes[0], groups):
        stats = g.groupby("prune_rate").agg(ca=("ca", "mean"), ca_sd=("ca", "std"), asr=("asr", "mean"),
                                            asr_sd=("asr", "std")).reset_index()
        ax.errorbar(stats.prune_rate, stats.asr, yerr=stats.asr_sd.fillna(0), marker="o", label="ASR", capsize=3)
        ax.errorbar(stats.prune_rate, stats.ca, yerr=stats.ca_sd.fillna(0), marker="s", ls="--", label="CA",
                    capsize=3)
        ax.set_title(f"{ds} · {model} · {attack} ({g.seed.nunique()} runs)")
        ax.set_xlabel("channels pruned per expert (%), before fine-tuning")
        ax.set_ylabel("%")
        ax.set_ylim(-3, 103)
        ax.legend()
    fig.tight_layout()
    _savefig(fig, out_png)
    plt.close(fig)


def _defense_label(m: dict) -> str:
    return f"Fine-Pruning {m['fine_pruned']}" if m.get("fine_pruned") else "none"


def precision_table(metric_paths: Sequence[str], out_csv: str, out_md: str, out_tex: str) -> pd.DataFrame:
    """ASR and BA of every model as deployed (fp32 / int8 / int4), mean ± std over seeds, and the share of
    routing positions that change against fp32."""
    rows = []
    for m in (m for p in metric_paths for m in read_json(p)):
        trigger, rate = ("clean", 0.0) if m["attack"] == "clean" else m["attack"].rsplit("-", 1)
        rows.append({"dataset": m["dataset"], "model": m["model"], "trigger": trigger, "rate": float(rate),
                     "defense": _defense_label(m), "seed": m["seed"], "precision": m["precision"], "ba": m["ba"],
                     "asr": m.get("asr", np.nan), "routing_change_clean": 100 * m.get("routing_change_clean", np.nan),
                     "routing_change_triggered": 100 * m.get("routing_change_triggered", np.nan)})
    df = pd.DataFrame(rows)
    keys = ["dataset", "model", "defense", "trigger", "rate", "precision"]
    vals = ["asr", "ba", "routing_change_clean", "routing_change_triggered"]
    summary = df.groupby(keys).agg(seeds=("seed", "count"), **{f"{v}_mean": (v, "mean") for v in vals},
                                   **{f"{v}_std": (v, "std") for v in vals}).reset_index()
    with atomic_path(out_csv) as tmp:
        summary.to_csv(tmp, index=False)
    precisions = [p for p in ("fp32", "int8", "int4") if p in set(summary.precision)]
    header = ["Dataset", "Model", "Defense", "Trigger", "Rate %", "Seeds"] + [f"ASR {p}" for p in precisions] \
        + [f"BA {p}" for p in precisions] + [f"routing Δ {p} (trig.)" for p in precisions if p != "fp32"]
    body = []
    for key, g in summary.groupby(keys[:-1], sort=True):
        by = {r["precision"]: r for r in g.to_dict("records")}
        cell = lambda p, v, d=1: _pm(by[p][f"{v}_mean"], by[p][f"{v}_std"], d) if p in by else "–"  # noqa: E731
        body.append([key[0], key[1], key[2], key[3], "–" if key[3] == "clean" else f"{key[4]:g}",
                     str(int(g.seeds.max()))]
                    + [cell(p, "asr") for p in precisions] + [cell(p, "ba") for p in precisions]
                    + [cell(p, "routing_change_triggered" if key[3] != "clean" else "routing_change_clean")
                       for p in precisions if p != "fp32"])
    title = ("Models as deployed: ASR and BA (%) at each precision (int8: W8A8 per-channel symmetric weights, "
             "per-tensor affine activations calibrated on clean training images; int4: weight-only per-channel "
             "symmetric), mean ± std over seeds; routing Δ: % of top-k positions that differ from fp32 (triggered "
             "test images; clean images for clean models)")
    write_markdown(out_md, header, body, title)
    write_latex(out_tex, header, body, title)
    return summary


def detection_table(nc_paths: Sequence[str], out_csv: str, out_md: str, out_tex: str) -> pd.DataFrame:
    """Neural Cleanse detection rate per trigger, rate and precision over models; false positives on clean ones."""
    rows = []
    for p in nc_paths:
        m = read_json(p)
        trigger, rate = ("clean", 0.0) if m["attack"] == "clean" else m["attack"].rsplit("-", 1)
        idx = m["anomaly_index"]
        target_pos = [c["class"] for c in m["classes"]].index(m["target"]) if any(
            c["class"] == m["target"] for c in m["classes"]) else None
        rows.append({"dataset": m["dataset"], "model": m["model"], "trigger": trigger, "rate": float(rate),
                     "seed": m["seed"], "precision": m["precision"], "flagged": 100.0 * m["flagged"],
                     "detected_target": 100.0 * m["detected_target"],
                     "target_anomaly_index": idx[target_pos] if target_pos is not None else np.nan,
                     "target_l1": m["classes"][target_pos]["l1"] if target_pos is not None else np.nan,
                     "median_l1": float(np.median([c["l1"] for c in m["classes"]])), "seconds": m["seconds"]})
    df = pd.DataFrame(rows)
    keys = ["dataset", "model", "trigger", "rate", "precision"]
    summary = df.groupby(keys).agg(models=("seed", "count"), flagged=("flagged", "mean"),
                                   detected_target=("detected_target", "mean"),
                                   target_anomaly_index=("target_anomaly_index", "mean"),
                                   target_l1=("target_l1", "mean"), median_l1=("median_l1", "mean"),
                                   seconds=("seconds", "mean")).reset_index()
    with atomic_path(out_csv) as tmp:
        summary.to_csv(tmp, index=False)
    header = ["Dataset", "Model", "Trigger", "Rate %", "Precision", "Models", "Flagged %", "Target found %",
              "Target anomaly index", "Target mask L1", "Median mask L1", "s per model"]
    body = [[r["dataset"], r["model"], r["trigger"], "–" if r["trigger"] == "clean" else f"{r['rate']:g}",
             r["precision"], str(r["models"]), _num(r["flagged"]),
             "–" if r["trigger"] == "clean" else _num(r["detected_target"]), _num(r["target_anomaly_index"], 2),
             _num(r["target_l1"]), _num(r["median_l1"]), _num(r["seconds"], 0)] for r in summary.to_dict("records")]
    title = ("Neural Cleanse on the models as deployed: share of models flagged (for clean models these are false "
             "positives) and share whose flagged class is the attack's target; mean over models")
    write_markdown(out_md, header, body, title)
    write_latex(out_tex, header, body, title)
    return summary
