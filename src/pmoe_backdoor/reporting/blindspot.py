"""The quantization-blindspot table (after Pandey & Ye, arXiv 2512.06243): five backdoor defenses on the
models as deployed at each precision, beside the paper's claims, and a figure of the detection rate per precision.

A defense "detects" an attacked model when its model-level decision flags it (Neural Cleanse, STRIP, Activation
Clustering, Spectral Signatures; see each module for its rule) or, for Fine-Pruning, when the ASR of the
fine-pruned model at that precision is below a stated level; the same decision on clean models is a false positive
(Fine-Pruning is not run on clean models). ASR and BA are those of the undefended model at that precision.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

from ..defenses import DEFENSES, DefenseSummary
from ..io import read_json
from ..naming import parse_attack
from .figures import _plt, _savefig
from .tables import HtmlLayout, num, pm, std, write_csv, write_table

PRECISION_ORDER = ("fp32", "int8_dynamic", "int8", "int4")
PRECISION_NOTES = {"int8_dynamic": "int8 dynamic (PyTorch: Linear layers only)", "int8": "int8 static W8A8",
                   "int4": "int4 weight-only (simulated)"}
# the registry's order (the paper's defenses first), then Fine-Pruning's rows
DEFENSE_ORDER = tuple(spec.title for spec in DEFENSES.values())
MARKERS = "osD^vP*Xph"


def paper_claim(defense: str, precision: str, paper_dataset: str) -> tuple[str, float | None, float | None]:
    """Pandey & Ye's claim for a cell as (text, detection rate % it implies or None, the ASR % it says stays above
    or None). INT8 means their dynamic quantization; they state nothing here for fp32 or static int8."""
    if precision == "int8_dynamic":
        return "0 % detected, ASR > 99 %", 0.0, 99.0
    if precision == "int4" and defense == "Neural Cleanse":
        if paper_dataset == "gtsrb":
            return "NC detects (GTSRB)", 100.0, None
        return "NC 0 % (CIFAR-10), ASR > 90 %", 0.0, 90.0
    return "", None, None


def _row(m: dict, defense: str, detected: bool, target_found: bool | None = None, asr_after: float | None = None
         ) -> dict:
    """One decision; target_found: 100 when a label-level defense names the attack's target among the labels it
    flags, 0 when not, nan for a clean model or a defense that names no label (STRIP decides per input,
    Fine-Pruning and fine-tuning by ASR)."""
    trigger, rate = parse_attack(m["attack"])
    return {"dataset": m["dataset"], "model": m["model"], "defense": defense, "trigger": trigger, "rate": float(rate),
            "seed": m["seed"], "precision": m["precision"], "detected": 100.0 * bool(detected),
            "target_found": np.nan if target_found is None else 100.0 * bool(target_found),
            "asr_after": np.nan if asr_after is None else asr_after,
            # data-level defenses: the recall of the samples they call poisoned; Spectral Signatures also that of
            # removing as many samples at random (its fraction removed)
            "poison_recall": m.get("poison_recall", np.nan), "random_removal_recall": m.get("random_removal_recall",
                                                                                           np.nan),
            # input-level defenses: the share of triggered test inputs flagged, of held-out-like clean inputs
            # rejected, and (patch ablation) of triggered inputs whose top-ranked patch lies on the trigger
            **{key: 100.0 * m[key] if m.get(key) is not None else np.nan
               for key in ("detection", "frr", "localisation")}}


def collect(defense_paths: Sequence[str], deployed_paths: Sequence[str], fine_pruned_paths: Sequence[str],
            fp_asr_level: float, precisions: Sequence[str] | None = None) -> pd.DataFrame:
    """One row per defense, model and precision (only ``precisions`` if given): detected (0/100), with the
    undefended model's ASR and BA there."""
    rows = []
    for p in defense_paths:
        s = DefenseSummary.from_dict(read_json(p), p)
        rows.append(_row(s.fields, s.title, s.flagged, s.target_found, s.asr_after))
    for p in fine_pruned_paths:
        for m in read_json(p):
            asr = m.get("asr", np.nan)
            rows.append(_row(m, f"Fine-Pruning ({m['fine_pruned']})", asr < fp_asr_level, None, asr))
    df = pd.DataFrame(rows)
    if precisions is not None and len(df):
        df = df[df.precision.isin(list(precisions))]
    deployed = pd.DataFrame([{k: m.get(k, np.nan) for k in ("dataset", "model", "attack", "seed", "precision",
                                                            "ba", "asr")}
                             for p in deployed_paths for m in read_json(p) if not m.get("fine_pruned")])
    if len(deployed) and len(df):
        deployed["trigger"] = [parse_attack(a)[0] for a in deployed.attack]
        deployed["rate"] = [float(parse_attack(a)[1]) for a in deployed.attack]
        df = df.merge(deployed.drop(columns="attack"), how="left",
                      on=["dataset", "model", "trigger", "rate", "seed", "precision"])
    return df


def _order(df: pd.DataFrame) -> pd.DataFrame:
    prec = {p: i for i, p in enumerate(PRECISION_ORDER)}
    dfn = {d: i for i, d in enumerate(DEFENSE_ORDER)}
    return df.assign(_p=df.precision.map(lambda p: prec.get(p, len(prec))),
                     _d=df.defense.map(lambda d: dfn.get(d, len(dfn))), _c=(df.trigger != "clean").astype(int)
                     ).sort_values(["dataset", "model", "_d", "defense", "_c", "trigger", "rate", "_p"]
                                   ).drop(columns=["_p", "_d", "_c"])


def summarise(df: pd.DataFrame, paper_name: str) -> pd.DataFrame:
    """Per dataset, model, defense, trigger, rate and precision: models, detection (clean: false-positive) rate,
    ASR and BA, mean ± std over seeds; the paper's claim and whether ours agrees with it."""
    out = []
    keys = ["dataset", "model", "defense", "trigger", "rate", "precision"]
    for key, g in df.groupby(keys, sort=False):
        r = dict(zip(keys, key))
        r.update(models=len(g), detected_mean=g.detected.mean(), detected_std=std(g.detected),
                 target_found_mean=g.target_found.mean(),
                 asr_mean=g["asr"].mean() if "asr" in g else np.nan, asr_std=std(g["asr"]) if "asr" in g else np.nan,
                 ba_mean=g["ba"].mean() if "ba" in g else np.nan, ba_std=std(g["ba"]) if "ba" in g else np.nan,
                 asr_after_mean=g.asr_after.mean(), poison_recall_mean=g.poison_recall.mean(),
                 inputs_detected_mean=g.detection.mean(), frr_mean=g.frr.mean(), localised_mean=g.localisation.mean(),
                 random_removal_recall_mean=g.random_removal_recall.mean())
        claim, det, asr_floor = paper_claim(r["defense"], r["precision"], paper_name)
        r["paper"] = claim if r["trigger"] != "clean" else ""
        agrees = None
        if r["paper"] and det is not None:
            agrees = bool((r["detected_mean"] > 0) == (det > 0))
            if asr_floor is not None and not np.isnan(r["asr_mean"]):
                agrees = agrees and bool(r["asr_mean"] > asr_floor)
        r["agrees"] = agrees
        out.append(r)
    return _order(pd.DataFrame(out)).reset_index(drop=True) if out else pd.DataFrame(out)


def blindspot_table(defense_paths: Sequence[str], deployed_paths: Sequence[str], fine_pruned_paths: Sequence[str],
                    fp_asr_level: float, paper_name: str, out_csv: str, out_md: str, out_tex: str,
                    out_html: str | None = None, precisions: Sequence[str] | None = None) -> pd.DataFrame:
    """The table from the defenses' summaries, the deployed models' ASR/BA and the Fine-Pruned models as deployed,
    restricted to ``precisions`` if given."""
    if not defense_paths and not fine_pruned_paths:
        raise ValueError("blindspot_table: no defense result to tabulate (enable blindspot or neural_cleanse)")
    summary = summarise(collect(defense_paths, deployed_paths, fine_pruned_paths, fp_asr_level, precisions),
                        paper_name)
    if summary.empty:
        raise ValueError(f"blindspot_table: none of the {len(defense_paths)} defense results and "
                         f"{len(fine_pruned_paths)} Fine-Pruning files is at the precisions {list(precisions or [])}")
    write_csv(summary, out_csv)
    header = ["Dataset", "Model", "Defense", "Trigger", "Rate %", "Precision", "Models", "Detected % (clean: FP %)",
              "Target label flagged %", "Inputs flagged %", "FRR %", "Localised %", "ASR %", "BA %",
              "ASR after defense %", "Paper (Pandey & Ye)", "Agrees"]
    body = [[r["dataset"], r["model"], r["defense"], r["trigger"], "–" if r["trigger"] == "clean" else f"{r['rate']:g}",
             PRECISION_NOTES.get(r["precision"], r["precision"]), str(r["models"]),
             pm(r["detected_mean"], r["detected_std"], 0), num(r["target_found_mean"], 0),
             num(r["inputs_detected_mean"], 0), num(r["frr_mean"], 1), num(r["localised_mean"], 0),
             pm(r["asr_mean"], r["asr_std"]), pm(r["ba_mean"], r["ba_std"]), num(r["asr_after_mean"]),
             r["paper"] or "–", {True: "yes", False: "no"}.get(r["agrees"], "–")] for r in summary.to_dict("records")]
    title = (f"Quantization blindspot: each defense on the models as deployed; Detected %: share of attacked models "
             f"the defense flags (removal defenses - Fine-Pruning, fine-tuning - : ASR after them below "
             f"{fp_asr_level:g} %, fine-tuning by its own removal_asr), for clean models the false "
             "positives; Target label flagged %: share of attacked models whose flagged labels include the attack's "
             "target (label-level defenses); Inputs flagged % and FRR %: input-level defenses' share of triggered "
             "test inputs flagged and of clean test inputs rejected at the threshold set on held-out clean inputs "
             "(a clean model's triggered inputs carry the analysed triggers); Localised %: share of triggered inputs "
             "whose top-ranked patch lies on the trigger (patch-located triggers); ASR after defense: after a "
             "removal defense, and for the patch-ablation "
             "defenses (router- and saliency-guided) the ASR once each flagged input is purified; mean ± std over "
             "seeds; ASR and BA of the undefended model at that "
             f"precision; the paper's claim for {paper_name} (INT8 = dynamic quantization) and whether ours agrees. "
             "Departures from the defenses' papers: Neural Cleanse's default budget is this project's short one "
             "(budget: original is Wang et al.'s); Activation Clustering calls a cluster by its relative size (Chen et "
             "al.'s size rule, not their exclusionary reclassification, which retrains the network) on PCA scores "
             "instead of ICA; Spectral Signatures' and "
             "Activation Clustering's model verdicts (a MAD outlier rule across labels; any label flagged) are this "
             "project's, and the CSV gives Spectral Signatures' poison recall beside random removal's")
    # the page names each precision as the figure does, its description in the glossary: written out in every row,
    # the descriptions widen the table past a browser window
    write_table(header, body, title, out_md, out_tex, out_html,
                HtmlLayout(cell_abbreviations={note: p for p, note in PRECISION_NOTES.items()}))
    return summary


def _detection_rates(g: pd.DataFrame, defense: str, precisions: Sequence[str]) -> pd.Series:
    """The share (%) of the models in ``g`` that ``defense`` flags, per precision (in the order of ``precisions``);
    every model counts once: each (trigger, rate) cell is weighted by its number of models."""
    d = g[g.defense == defense]
    rate = d.assign(w=d.detected_mean * d.models).groupby("precision").agg(w=("w", "sum"), n=("models", "sum"))
    rate = rate.loc[[p for p in precisions if p in rate.index]]
    return rate.w / rate.n


def _rate_lines(ax, g: pd.DataFrame, precisions: Sequence[str], ylabel: str, defenses: Sequence[str]) -> None:
    """One line per defense: the share of the models in ``g`` it flags, per precision; a defense keeps its colour,
    marker and offset (its place in ``defenses``) in every panel."""
    pos = {p: i for i, p in enumerate(precisions)}
    for i, defense in enumerate(defenses):
        rate = _detection_rates(g, defense, precisions)
        if rate.empty:
            continue
        # equal rates (0 % and 100 % are common) would hide lines behind each other: offset each by <= 3 points
        shift = (i - (len(defenses) - 1) / 2) * min(1.5, 6.0 / max(1, len(defenses)))
        ax.plot([pos[p] for p in rate.index], rate + shift, marker=MARKERS[i % len(MARKERS)],
                ls="-" if i < 10 else "--", color=f"C{i % 10}", label=defense)
    ax.set_xticks(range(len(precisions)), precisions)
    ax.set_ylim(-6, 106)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.4)


def _rate_bars(ax, g: pd.DataFrame, precision: str, ylabel: str, defenses: Sequence[str]) -> None:
    """At a single precision, lines would be single markers stacked at one x: one bar per defense instead, the
    defenses side by side along the x axis, each bar labelled with its rate (a 0 % bar has no height to see);
    a defense keeps its colour (its place in ``defenses``) in every panel."""
    shown = []
    for i, defense in enumerate(defenses):
        rate = _detection_rates(g, defense, [precision])
        if rate.empty:
            continue
        bars = ax.bar(len(shown), rate.iloc[0], width=0.7, color=f"C{i % 10}", label=defense)
        ax.bar_label(bars, labels=[f"{rate.iloc[0]:.0f} %"], padding=2, fontsize=8)
        shown.append(defense)
    ax.set_xticks(range(len(shown)), shown, rotation=35, ha="right", rotation_mode="anchor", fontsize=8)
    ax.set_xlim(-0.6, max(len(shown), 1) - 0.4)
    ax.set_xlabel(f"defense, on the models deployed at {precision}", fontsize=9)
    ax.set_ylim(0, 112)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.4, axis="y")


def draw_blindspot_figure(df: pd.DataFrame):
    """The figure of :func:`blindspot_figure` from the summaries' rows, as a matplotlib Figure."""
    plt = _plt()
    attacked, clean = df[df.trigger != "clean"], df[df.trigger == "clean"]
    panels = list(attacked.groupby(["dataset", "model"], sort=True))
    defenses = list(dict.fromkeys(df.defense))  # the summary's order (tables: DEFENSE_ORDER first)
    rows, cols = 2 if len(clean) else 1, max(1, len(panels))
    # bars (a panel with one precision) need room for a label per defense
    single = all(g.precision.nunique() == 1 for _, g in panels)
    width = max(5.5, 1.5 + 0.45 * len(defenses)) if single else 5.5
    fig, axes = plt.subplots(rows, cols, squeeze=False, figsize=(width * cols, 4 * rows + (1 if single else 0)),
                             layout="constrained")
    for col, ((ds, model), g) in enumerate(panels):
        precisions = [p for p in PRECISION_ORDER if p in set(g.precision)]
        c = clean[(clean.dataset == ds) & (clean.model == model)]
        if len(precisions) == 1:
            _rate_bars(axes[0, col], g, precisions[0], "attacked models detected (%)", defenses)
            axes[0, col].set_title(f"{ds} · {model}", fontsize=10)
            if rows == 2:
                _rate_bars(axes[1, col], c, precisions[0], "clean models flagged (%)", defenses)
        else:
            _rate_lines(axes[0, col], g, precisions, "attacked models detected (%)", defenses)
            axes[0, col].set_title(f"{ds} · {model} (lines offset ≤ 3 points to stay visible)", fontsize=10)
            if rows == 2:
                _rate_lines(axes[1, col], c, precisions, "clean models flagged (%)", defenses)
        if rows == 2:
            axes[1, col].set_title(f"{ds} · {model}: false positives", fontsize=10)
    if not single:  # bars name their defense on the x axis; lines need the legend
        handles, labels = axes[0, 0].get_legend_handles_labels()
        if handles:
            fig.legend(handles, labels, loc="outside lower center", ncol=min(3, len(labels)), fontsize=9)
    return fig


def blindspot_figure(summary_csvs: Sequence[str], out_png: str) -> None:
    """Per precision, one line per defense: the share of attacked models it detects (top row) and of clean models
    it flags (bottom row, where clean models were analysed); one column per dataset and model. With a single
    precision, one bar per defense."""
    plt = _plt()
    fig = draw_blindspot_figure(pd.concat([pd.read_csv(p) for p in summary_csvs], ignore_index=True))
    _savefig(fig, out_png)
    plt.close(fig)
