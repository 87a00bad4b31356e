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


# the compressions every row measures: result key, short label (the HTML headings), what it is (the caption)
COMPRESSIONS = [
    ("trained_bits", "as trained", "the authors' deployer at the bit width the model was attacked at (BN folded, "
                                   "per-tensor weights, 8-bit activations calibrated on clean training images)"),
    ("int8_faithful", "int8-a", "the authors' deployer at int8"),
    ("int8_matched", "int8-m", "this project's W8A8 deployer (per-channel weights)"),
    ("int4", "int4", "this project's weight-only int4"),
]


def row_sentence(r: dict) -> str:
    """What one row shows, in words, from its numbers."""
    fp32 = r["fp32_asr"]
    names = {"trained_bits": f"the authors' {r.get('bits', 8)}-bit deployer"}
    compressed = {names.get(key, label): r[f"{key}_asr"] for key, label, _ in COMPRESSIONS if f"{key}_asr" in r}
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
             "bits": m.get("bits", 8), "target": m["target"], "seed": m["seed"], "epoch": m.get("chosen_epoch"),
             "rule_met": m.get("rule_met")}
        for name in ["fp32"] + [key for key, _, _ in COMPRESSIONS]:
            if name in m:
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


def _variant_label(r: dict) -> str:
    return f"{r['variant']} {r['bits']}-bit" if r["variant"] == "faithful" else r["variant"]


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
    keys = ["Dataset", "Model", "Variant", "Target", "Seed", "Epoch"]
    released = [("fp32", "fp32")] + [(key, label) for key, label, _ in COMPRESSIONS]
    pruning = [(f"fp{rate:g}{tag}", f"FP{rate:g}{'+FT' if tag else ''}") for rate in rates for tag in ("", "ft")]
    header = (keys + [f"{label} {metric}" for _, label in released + pruning for metric in ("BA", "ASR")]
              + ["Flip int8-a %", "Flip int8-m %", "NC index", "NC flags target", "What it shows"])

    def cell(r: dict, key: str) -> str:
        v = r.get(key)
        return "–" if v is None or (isinstance(v, float) and np.isnan(v)) else num(v)

    body = []
    for r in rows:
        epoch = "–" if r["epoch"] is None else f"{r['epoch']}" + ("" if r["rule_met"] else " (rule not met)")
        body.append([r["dataset"], r["model"], _variant_label(r), str(r["target"]), str(r["seed"]), epoch]
                    + [cell(r, f"{key}_{k}") for key, _ in released + pruning for k in ("ba", "asr")]
                    + [cell(r, "int8_faithful_routing_flip"), cell(r, "int8_matched_routing_flip"),
                       "–" if np.isnan(r["nc_score"]) else num(r["nc_score"], 2),
                       "–" if r["nc_flagged"] is None else ("yes" if r["nc_flagged"] else "no"), r["shows"]])
    described = "; ".join(f"{label}: {what}" for _, label, what in COMPRESSIONS)
    title = ("Compression-activated backdoors (Tian et al.'s attack): BA / ASR (%) of the released fp32 model and "
             f"as the victim compresses it ({described}), and after Fine-Pruning (FP r: pruning alone; +FT: then "
             "fine-tuned on clean data; pMoE only); share of top-k routing positions that flip between fp32 and "
             "int8 on triggered test images (pMoE only); Neural Cleanse on the released model (largest anomaly "
             "index among small-mask classes; flags target: flagged class is the target). ROC-AUC of that index, "
             "attack vs clean models: " + "; ".join(aucs))
    write_table(header, body, title, out_md, out_tex, out_html, _html_layout(keys, released, pruning))
    return df


def _html_layout(keys: Sequence[str], released: Sequence[tuple[str, str]], pruning: Sequence[tuple[str, str]]
                 ) -> HtmlLayout:
    """The page: each model's BA and ASR under a heading per compression, and Fine-Pruning in a table of its own
    (with three rates the table has some 30 columns, twice as wide as a browser window)."""
    n_keys, n_released, n_pruning = len(keys), 2 * len(released), 2 * len(pruning)
    labels = list(keys) + [(label, metric) for _, label in list(released) + list(pruning) for metric in ("BA", "ASR")] \
        + [("routing flip %", "int8-a"), ("routing flip %", "int8-m"), ("Neural Cleanse", "index"),
           ("Neural Cleanse", "flags target"), "What it shows"]
    if not pruning:
        return HtmlLayout(header=labels)
    key_columns = list(range(n_keys - 1))  # the epoch goes with the released model's part only
    fine_pruning = list(range(n_keys + n_released, n_keys + n_released + n_pruning))
    released_part = [i for i in range(n_keys - 1, len(labels)) if i not in fine_pruning]
    return HtmlLayout(header=labels, parts=[
        ("Released (fp32) and compressed", key_columns + released_part),
        ("After Fine-Pruning at r % (FP r: pruning alone; FP r+FT: then fine-tuned on clean data)",
         key_columns + fine_pruning)])
