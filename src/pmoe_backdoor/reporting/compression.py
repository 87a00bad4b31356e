"""The "compression-activated backdoors" table: one row per attack model, its BA / ASR as released
(fp32) and as the victim compresses it, routing flips, Neural Cleanse on the released model, and a sentence saying
what the row shows."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

from ..io import read_json
from .tables import HtmlLayout, num, write_csv, write_table

# ASR (%) at which a compressed model counts as backdoored, and at most which the released one counts as clean, for
# the row's sentence only (the authors' claims: compressed ASR above 90 % with fp32 ASR at most 20 %)
ACTIVE_ASR = 90.0
QUIET_ASR = 20.0


def roc_auc(positives: Sequence[float], negatives: Sequence[float]) -> float:
    """The probability that a positive scores above a negative (ties count half); NaN without both kinds."""
    pos, neg = np.asarray(positives, float), np.asarray(negatives, float)
    if not len(pos) or not len(neg):
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).mean()
    ties = (pos[:, None] == neg[None, :]).mean()
    return float(greater + 0.5 * ties)


def _nc_score(summary: dict) -> float:
    """A model's Neural Cleanse score: the largest anomaly index among classes with a small reversed mask."""
    return float(summary["max_low_anomaly_index"])


def row_sentence(r: dict) -> str:
    """What one row shows, in words, from its numbers."""
    fp32 = r["fp32_asr"]
    compressed = {k: r[f"{k}_asr"] for k in ("int8_faithful", "int8_matched", "int4")}
    compressed.update({f"FP {rate:g} %": r[f"fp{rate:g}_asr"] for rate in r.get("fp_rates", [])})
    active = [k for k, v in compressed.items() if v >= ACTIVE_ASR]
    if fp32 > QUIET_ASR:
        return f"not stealthy: the released fp32 model already has ASR {fp32:.1f} %"
    if not active:
        best = max(compressed, key=compressed.get)
        return (f"stealthy at fp32 (ASR {fp32:.1f} %) but no compression activates it: highest ASR "
                f"{compressed[best]:.1f} % ({best})")
    return f"clean-looking at fp32 (ASR {fp32:.1f} %), backdoored after {', '.join(active)}"


def compression_rows(eval_paths: Sequence[str], nc_paths: Sequence[str] = ()) -> list[dict]:
    nc = {}
    for p in nc_paths:
        s = read_json(p)
        nc[(s["dataset"], s["model"], s["attack"], s["seed"])] = s
    rows = []
    for p in eval_paths:
        m = read_json(p)
        r = {"dataset": m["dataset"], "model": m["model"], "variant": m.get("variant", m["attack"].rsplit("-", 1)[0]),
             "target": m["target"], "seed": m["seed"], "epoch": m.get("chosen_epoch"), "rule_met": m.get("rule_met")}
        for name in ("fp32", "int8_faithful", "int8_matched", "int4"):
            r[f"{name}_ba"], r[f"{name}_asr"] = m[name]["ba"], m[name]["asr"]
        for name in ("int8_faithful", "int8_matched"):
            r[f"{name}_routing_flip"] = 100.0 * m[name].get("routing_flip_triggered", float("nan"))
        r["fp_rates"] = [f["rate"] for f in m.get("fine_pruning", [])]
        for f in m.get("fine_pruning", []):
            for stage, tag in (("pruned", ""), ("finetuned", "ft")):
                r[f"fp{f['rate']:g}{tag}_ba"], r[f"fp{f['rate']:g}{tag}_asr"] = f[stage]["ba"], f[stage]["asr"]
        s = nc.get((m["dataset"], m["model"], m["attack"], m["seed"]))
        r["nc_score"] = _nc_score(s) if s else float("nan")
        r["nc_flagged"] = (bool(s["flagged"]) and s["flagged_class"] == m["target"]) if s else None
        r["shows"] = row_sentence(r)
        rows.append(r)
    return rows


def compression_table(eval_paths: Sequence[str], nc_paths: Sequence[str], clean_nc_paths: Sequence[str],
                      out_csv: str, out_md: str, out_tex: str, out_html: str | None = None) -> pd.DataFrame:
    """Write the table; the Neural Cleanse ROC-AUC of the attack models against the clean models (fp32 summaries
    in ``clean_nc_paths``) goes into the title, per dataset."""
    rows = compression_rows(eval_paths, nc_paths)
    df = pd.DataFrame(rows).drop(columns=["fp_rates"], errors="ignore")
    write_csv(df, out_csv)
    clean = {}
    for p in clean_nc_paths:
        s = read_json(p)
        clean.setdefault(s["dataset"], []).append(_nc_score(s))
    aucs = []
    for d in sorted({r["dataset"] for r in rows}):
        scores = [r["nc_score"] for r in rows if r["dataset"] == d and not np.isnan(r["nc_score"])]
        auc = roc_auc(scores, clean.get(d, []))
        aucs.append(f"{d}: {num(auc, 2)} ({len(scores)} attack vs {len(clean.get(d, []))} clean models)")
    rates = sorted({rate for r in rows for rate in r["fp_rates"]})
    header = (["Dataset", "Variant", "Target", "Seed", "Epoch", "fp32 BA", "fp32 ASR", "int8-f BA", "int8-f ASR",
               "int8-m BA", "int8-m ASR", "int4 BA", "int4 ASR"]
              + [h for rate in rates for h in (f"FP{rate:g} BA", f"FP{rate:g} ASR", f"FP{rate:g}+FT BA",
                                               f"FP{rate:g}+FT ASR")]
              + ["Flip int8-f %", "Flip int8-m %", "NC index", "NC flags target", "What it shows"])

    def cell(r: dict, key: str) -> str:
        v = r.get(key)
        return "–" if v is None or (isinstance(v, float) and np.isnan(v)) else num(v)

    body = []
    for r in rows:
        epoch = "–" if r["epoch"] is None else f"{r['epoch']}" + ("" if r["rule_met"] else " (rule not met)")
        body.append([r["dataset"], r["variant"], str(r["target"]), str(r["seed"]), epoch]
                    + [cell(r, f"{n}_{k}") for n in ("fp32", "int8_faithful", "int8_matched", "int4")
                       for k in ("ba", "asr")]
                    + [cell(r, f"fp{rate:g}{tag}_{k}") for rate in rates for tag in ("", "ft") for k in ("ba", "asr")]
                    + [cell(r, "int8_faithful_routing_flip"), cell(r, "int8_matched_routing_flip"),
                       "–" if np.isnan(r["nc_score"]) else num(r["nc_score"], 2),
                       "–" if r["nc_flagged"] is None else ("yes" if r["nc_flagged"] else "no"), r["shows"]])
    title = ("Compression-activated backdoors (Tian et al.'s attack on the pMoE): BA / ASR (%) of the released fp32 "
             "model, as int8 (f: per-tensor W8, the authors' faithful scheme; m: this project's W8A8 deployer), int4, "
             "and after Fine-Pruning (FP r: pruning alone; +FT: then fine-tuned on clean data); share of top-k "
             "routing positions that flip between fp32 and int8 on triggered test images; Neural Cleanse on the "
             "released model (largest anomaly index among small-mask classes; flags target: flagged class is the "
             "target). ROC-AUC of that index, attack vs clean models: " + "; ".join(aucs))
    write_table(header, body, title, out_md, out_tex, out_html, _html_layout(header, rates))
    return df


def _html_layout(header: Sequence[str], rates: Sequence[float]) -> HtmlLayout:
    """The page: each model's BA and ASR under a heading per compression, and Fine-Pruning in a table of its own
    (with three rates the table has some 30 columns, twice as wide as a browser window)."""
    compressions = ["fp32", "int8-f", "int8-m", "int4"] + [f"FP{r:g}{tag}" for r in rates for tag in ("", "+FT")]
    labels = header[:5] + [(c, metric) for c in compressions for metric in ("BA", "ASR")] \
        + [("routing flip %", "int8-f"), ("routing flip %", "int8-m"), ("Neural Cleanse", "index"),
           ("Neural Cleanse", "flags target"), header[-1]]
    keys, fine_pruning = list(range(4)), list(range(13, 13 + 4 * len(rates)))
    if not rates:
        return HtmlLayout(header=labels)
    released = [i for i in range(4, len(header)) if i not in fine_pruning]
    return HtmlLayout(header=labels, parts=[
        ("Released (fp32) and compressed", keys + released),
        ("After Fine-Pruning at r % (FP r: pruning alone; FP r+FT: then fine-tuned on clean data)",
         keys + fine_pruning)])
