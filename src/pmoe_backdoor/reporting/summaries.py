"""The study's tables from per-run results: Tables 1-2 (attacks), Table 3 (Fine-Pruning), deployment
precisions, Neural Cleanse detection and routing statistics; each as CSV, Markdown, LaTeX and HTML."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from ..deployment.quantize import DEPLOY_PRECISIONS
from ..io import read_json
from ..naming import parse_attack
from .tables import HtmlLayout, frame_cells, num, pm, std, write_csv, write_html, write_table


def collect_runs(metric_paths: Sequence[str], out_csv: str, out_html: str | None = None) -> pd.DataFrame:
    """One row per run: dataset, model, attack, trigger, rate, seed, BA, ASR, test loss (and, if asked, the same
    as an HTML page)."""
    rows = []
    for p in metric_paths:
        m = read_json(p)
        trigger, rate = parse_attack(m["attack"])
        rows.append({"dataset": m["dataset"], "model": m["model"], "attack": m["attack"], "trigger": trigger,
                     "rate": float(rate), "seed": m["seed"], "ba": m["ba"], "asr": m.get("asr", np.nan),
                     "test_loss": m["test_loss"], "path": str(p)})
    df = pd.DataFrame(rows)
    write_csv(df, out_csv)
    if out_html:
        datasets = ", ".join(sorted(set(df.get("dataset", []))))
        title = (f"Every training run of {datasets}: benign accuracy (ba, %), attack success rate (asr, %) and test "
                 "loss, one row per model, attack and seed")
        write_html(out_html, *frame_cells(df), title)
    return df


def cad_std(clean_ba: pd.Series, attack_ba: pd.Series) -> float:
    """The spread of CAD over seeds: sqrt(std(CA)² + std(BA)²), the std of one clean run's accuracy minus one
    attack run's (independent runs), comparable with the tables' other stds over seeds (it is not the standard
    error of the difference of the means). A side with a single seed has no std and is left out (the other
    side's std alone); nan when neither side has two seeds, or there is no clean run."""
    if not len(clean_ba):
        return float("nan")
    variances = [std(x) ** 2 for x in (clean_ba, attack_ba) if len(x) > 1]
    return math.sqrt(sum(variances)) if variances else float("nan")


def summarise_attacks(runs: pd.DataFrame, paper: pd.DataFrame | None, dataset: str, paper_name: str) -> pd.DataFrame:
    """Mean and std over seeds of ASR, BA and CAD (CAD = the mean clean accuracy of the same dataset and model
    minus the mean BA; its std by :func:`cad_std`), beside the paper's values and the difference."""
    df = runs[runs.dataset == dataset]
    clean_runs = df[df.attack == "clean"]
    clean = clean_runs.groupby("model").ba.mean()
    rows = []
    for (model, trigger, rate), g in df.groupby(["model", "trigger", "rate"], sort=True):
        ca, ca_runs = clean.get(model, np.nan), clean_runs[clean_runs.model == model].ba
        row = {"dataset": dataset, "model": model, "trigger": trigger, "rate": rate, "seeds": len(g),
               "asr_mean": g.asr.mean(), "asr_std": std(g.asr), "ba_mean": g.ba.mean(), "ba_std": std(g.ba),
               "cad_mean": ca - g.ba.mean() if trigger != "clean" else np.nan,
               "cad_std": cad_std(ca_runs, g.ba) if trigger != "clean" else np.nan}
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


def attack_table(runs_csv: str, paper_csv: str | None, dataset: str, paper_name: str, out_csv: str, out_md: str,
                 out_tex: str, out_html: str | None = None) -> pd.DataFrame:
    runs = pd.read_csv(runs_csv)
    paper = pd.read_csv(paper_csv) if paper_csv and Path(paper_csv).is_file() else None
    table = summarise_attacks(runs, paper, dataset, paper_name)
    write_csv(table, out_csv)
    header = ["Model", "Trigger", "Rate %", "Seeds", "ASR %", "paper", "Δ", "BA %", "paper", "Δ", "CAD", "paper", "Δ"]
    rows = []
    for r in table.itertuples():
        clean = r.trigger == "clean"
        rows.append([r.model, r.trigger, "–" if clean else f"{r.rate:g}", str(r.seeds),
                     pm(r.asr_mean, r.asr_std), num(getattr(r, "paper_asr", np.nan)),
                     num(getattr(r, "diff_asr", np.nan), signed=True),
                     pm(r.ba_mean, r.ba_std), num(getattr(r, "paper_ba", np.nan)),
                     num(getattr(r, "diff_ba", np.nan), signed=True),
                     pm(r.cad_mean, r.cad_std), num(getattr(r, "paper_cad", np.nan)),
                     num(getattr(r, "diff_cad", np.nan), signed=True)])
    title = (f"{dataset}: attack success rate (ASR), benign accuracy (BA) and clean accuracy drop (CAD), mean ± std "
             f"over seeds; paper values for {paper_name}; the clean row's BA is the clean accuracy (CA); CAD = mean "
             "CA − mean BA, ± sqrt(std(CA)² + std(BA)²) (one side's std alone where the other has one seed)")
    write_table(header, rows, title, out_md, out_tex, out_html)
    return table


def fine_pruning_table(metric_paths: Sequence[str], out_csv: str, out_md: str, out_tex: str,
                       paper_csv: str | None = None, paper_names: dict[str, str] | None = None,
                       out_html: str | None = None) -> pd.DataFrame:
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
            trigger, rate = parse_attack(r["attack"])
            hit = paper[(paper.dataset == (paper_names or {}).get(r["dataset"], r["dataset"]))
                        & (paper.trigger == trigger) & np.isclose(paper.poison_rate_percent, float(rate))
                        & np.isclose(paper.prune_rate, r["prune_rate"])]
            if len(hit):
                for col in stages:
                    summary.loc[i, f"paper_{col}"] = hit[col].iloc[0]
    write_csv(summary, out_csv)
    header = ["Dataset", "Model", "Attack", "Fine-tune data", "Pruned %", "Runs", "CA before", "ASR before",
              "CA pruned", "ASR pruned", "CA fine-tuned", "ASR fine-tuned"]
    body = []
    for r in summary.to_dict("records"):
        cells = []
        for col in stages:
            cell = pm(r[f"{col}_mean"], r[f"{col}_std"])
            if not math.isnan(r[f"paper_{col}"]):
                cell += f" [{r[f'paper_{col}']:.1f}]"
            cells.append(cell)
        body.append([r["dataset"], r["model"], r["attack"], r["finetune_data"] + (" (masked)" if r["mask"] else ""),
                     f"{r['prune_rate']:g}", str(r["runs"])] + cells)
    title = ("Fine-Pruning of the experts' layers: clean accuracy (CA) and ASR in %, mean ± std over runs; "
             "[the paper's value] where its Table 3 can be recovered")
    write_table(header, body, title, out_md, out_tex, out_html)
    return summary


def _defense_label(m: dict) -> str:
    return f"Fine-Pruning {m['fine_pruned']}" if m.get("fine_pruned") else "none"


def precision_table(metric_paths: Sequence[str], out_csv: str, out_md: str, out_tex: str,
                    out_html: str | None = None) -> pd.DataFrame:
    """ASR and BA of every model as deployed (fp32 / int8 / int4), mean ± std over seeds, and the share of
    routing positions that change against fp32."""
    rows = []
    for m in (m for p in metric_paths for m in read_json(p)):
        trigger, rate = parse_attack(m["attack"])
        rows.append({"dataset": m["dataset"], "model": m["model"], "trigger": trigger, "rate": float(rate),
                     "defense": _defense_label(m), "seed": m["seed"], "precision": m["precision"], "ba": m["ba"],
                     "asr": m.get("asr", np.nan), "routing_change_clean": 100 * m.get("routing_change_clean", np.nan),
                     "routing_change_triggered": 100 * m.get("routing_change_triggered", np.nan)})
    df = pd.DataFrame(rows)
    keys = ["dataset", "model", "defense", "trigger", "rate", "precision"]
    vals = ["asr", "ba", "routing_change_clean", "routing_change_triggered"]
    summary = df.groupby(keys).agg(seeds=("seed", "count"), **{f"{v}_mean": (v, "mean") for v in vals},
                                   **{f"{v}_std": (v, "std") for v in vals}).reset_index()
    write_csv(summary, out_csv)
    precisions = [p for p in DEPLOY_PRECISIONS if p in set(summary.precision)]
    header = ["Dataset", "Model", "Defense", "Trigger", "Rate %", "Seeds"] + [f"ASR {p}" for p in precisions] \
        + [f"BA {p}" for p in precisions] + [f"routing Δ {p} (trig.)" for p in precisions if p != "fp32"]
    body = []
    for key, g in summary.groupby(keys[:-1], sort=True):
        by = {r["precision"]: r for r in g.to_dict("records")}
        cell = lambda p, v, d=1: pm(by[p][f"{v}_mean"], by[p][f"{v}_std"], d) if p in by else "–"  # noqa: E731
        body.append([key[0], key[1], key[2], key[3], "–" if key[3] == "clean" else f"{key[4]:g}",
                     str(int(g.seeds.max()))]
                    + [cell(p, "asr") for p in precisions] + [cell(p, "ba") for p in precisions]
                    + [cell(p, "routing_change_triggered" if key[3] != "clean" else "routing_change_clean")
                       for p in precisions if p != "fp32"])
    title = ("Models as deployed: ASR and BA (%) at each precision (int8: W8A8 per-channel symmetric weights, "
             "per-tensor affine activations calibrated on clean training images; int4: weight-only per-channel "
             "symmetric; int8_dynamic: PyTorch's dynamic quantization, which quantizes the final Linear layer only, "
             "per-tensor int8 weights and per-batch activations, every convolution fp32), mean ± std over seeds; "
             "routing Δ: % of top-k positions that differ from fp32 (triggered test images; clean images for clean "
             "models)")
    # the page: precisions under a heading per quantity, and routing in a table of its own (with every precision,
    # eleven mean ± std columns beside the six that identify a row do not fit a browser window)
    changed = [p for p in precisions if p != "fp32"]
    labels = header[:6] + [("ASR %", p) for p in precisions] + [("BA %", p) for p in precisions] \
        + [("routing Δ %", p) for p in changed]
    keys, outcomes = list(range(6)), list(range(6, 6 + 2 * len(precisions)))
    parts = [("ASR and BA (%) at each precision", keys + outcomes)]
    if changed:
        parts.append(("routing Δ: % of top-k positions that differ from fp32 (triggered test images; clean images "
                      "for clean models)", keys + list(range(6 + 2 * len(precisions), len(header)))))
    write_table(header, body, title, out_md, out_tex, out_html, HtmlLayout(header=labels, parts=parts))
    return summary


def detection_table(nc_paths: Sequence[str], out_csv: str, out_md: str, out_tex: str,
                    out_html: str | None = None) -> pd.DataFrame:
    """Neural Cleanse detection rate per trigger, rate and precision over models; false positives on clean ones."""
    rows = []
    for p in nc_paths:
        m = read_json(p)
        trigger, rate = parse_attack(m["attack"])
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
    write_csv(summary, out_csv)
    header = ["Dataset", "Model", "Trigger", "Rate %", "Precision", "Models", "Flagged %", "Target found %",
              "Target anomaly index", "Target mask L1", "Median mask L1", "s per model"]
    body = [[r["dataset"], r["model"], r["trigger"], "–" if r["trigger"] == "clean" else f"{r['rate']:g}",
             r["precision"], str(r["models"]), num(r["flagged"]),
             "–" if r["trigger"] == "clean" else num(r["detected_target"]), num(r["target_anomaly_index"], 2),
             num(r["target_l1"]), num(r["median_l1"]), num(r["seconds"], 0)] for r in summary.to_dict("records")]
    title = ("Neural Cleanse on the models as deployed: share of models flagged (for clean models these are false "
             "positives) and share whose flagged class is the attack's target; mean over models")
    write_table(header, body, title, out_md, out_tex, out_html)
    return summary


def routing_stats_table(stat_paths: Sequence[str], out_csv: str, out_md: str, out_tex: str,
                        out_html: str | None = None) -> pd.DataFrame:
    """Per dataset, model, attack and square trigger: mean ± std over seeds of how often the trigger patch
    reaches the experts, on triggered and on untriggered test images."""
    recs = []
    for p in stat_paths:
        m = read_json(p)
        for trig, s in m["triggers"].items():
            for images in ("triggered", "untriggered"):
                st = s[images]
                recs.append({"dataset": m["dataset"], "model": m["model"], "attack": m["attack"], "seed": m["seed"],
                             "trigger": trig, "images": images, "reached_fraction": 100 * st["reached_fraction"],
                             "mean_experts": st["mean_experts"],
                             **{f"expert{e + 1}": 100 * v for e, v in enumerate(st["per_expert_fraction"])}})
    df = pd.DataFrame(recs)
    value_cols = ["reached_fraction", "mean_experts"] + [c for c in df.columns if c.startswith("expert")]
    summary = df.groupby(["dataset", "model", "trigger", "attack", "images"], sort=True).agg(
        seeds=("seed", "count"), **{f"{c}_mean": (c, "mean") for c in value_cols},
        **{f"{c}_std": (c, "std") for c in value_cols}).reset_index()
    write_csv(summary, out_csv)
    experts = [c for c in value_cols if c.startswith("expert")]
    header = ["Dataset", "Model", "Trigger", "Model trained on", "Images", "Seeds", "Patch reaches ≥1 expert %",
              "Experts receiving it"] + [f"E{c[6:]} %" for c in experts]
    body = [[r["dataset"], r["model"], r["trigger"], r["attack"], r["images"], str(r["seeds"]),
             pm(r["reached_fraction_mean"], r["reached_fraction_std"]),
             pm(r["mean_experts_mean"], r["mean_experts_std"], 2)]
            + [pm(r[f"{c}_mean"], r[f"{c}_std"]) for c in experts] for r in summary.to_dict("records")]
    title = ("Routing of the square trigger's patch over the non-target test set: share of images whose trigger "
             "patch reaches at least one expert, the mean number of experts receiving it, and per expert the share "
             "of images; mean ± std over seeds")
    write_table(header, body, title, out_md, out_tex, out_html)
    return summary
