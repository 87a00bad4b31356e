"""The study's figures: ASR/BA against the poisoning rate, the pruning sweep, the routing figures (the paper's
Figures 2-6), routing statistics and Neural Cleanse's reversed masks."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from ..io import atomic_path, read_json
from ..naming import parse_attack


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    sns.set_theme(style="white", context="notebook")
    return plt


def _savefig(fig, path: str) -> None:
    with atomic_path(path, suffix=Path(path).suffix) as tmp:
        fig.savefig(tmp, dpi=130, bbox_inches="tight", format=Path(path).suffix.lstrip("."))


def _image_grid(plt, rows: int, cols: int, cell: tuple[float, float], **kw):
    """Subplots for a grid of images: the 'compressed' layout packs fixed-aspect axes and the suptitle without the
    empty bands that tight_layout leaves around square images."""
    return plt.subplots(rows, cols, figsize=(cell[0] * cols, cell[1] * rows), squeeze=False, layout="compressed",
                        **kw)


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
    fig, axes = plt.subplots(len(datasets), max(len(triggers), 1), squeeze=False, layout="constrained",
                             figsize=(4.2 * max(len(triggers), 1), 3.4 * len(datasets) + 0.5), sharey=True)
    palette = sns.color_palette("deep")
    for i, ds in enumerate(datasets):
        for j, trig in enumerate(triggers):
            ax = axes[i, j]
            sub = attacks[(attacks.dataset == ds) & (attacks.trigger == trig)]
            for k, (model, g) in enumerate(sub.groupby("model")):
                stats = g.groupby("rate").agg(asr=("asr", "mean"), asr_sd=("asr", "std"),
                                              ba=("ba", "mean"), ba_sd=("ba", "std")).reset_index()
                ax.errorbar(stats.rate, stats.asr, yerr=_clipped_err(stats.asr, stats.asr_sd, 0, 100), marker="o",
                            color=palette[k], label=f"{model} ASR", capsize=3)
                ax.errorbar(stats.rate, stats.ba, yerr=_clipped_err(stats.ba, stats.ba_sd, 0, 100), marker="s",
                            ls="--", color=palette[k], label=f"{model} BA", capsize=3, alpha=0.8)
            if paper is not None:
                pp = paper[(paper.dataset == paper_names.get(ds, ds)) & (paper.trigger == trig)]
                if len(pp):
                    ax.plot(pp.poison_rate_percent, pp.asr, "k^", mfc="none", label="paper ASR")
                    ax.plot(pp.poison_rate_percent, pp.ba, "kv", mfc="none", label="paper BA")
            ax.set_xscale("log")
            ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
            ax.set_title(f"{ds} · {trig}")
            ax.set_xlabel("poisoning rate (% of training set, log scale)")
            if j == 0:
                ax.set_ylabel("%")
            ax.set_ylim(-3, 103)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=min(len(labels), 6))
    _savefig(fig, out_png)
    plt.close(fig)


def _clipped_err(mean: pd.Series, sd: pd.Series, lo: float, hi: float) -> np.ndarray:
    """± sd as asymmetric error bars cut at the quantity's valid range (a percentage never leaves [0, 100])."""
    mean, sd = np.asarray(mean, float), np.nan_to_num(np.asarray(sd, float))
    return np.stack([np.minimum(sd, mean - lo), np.minimum(sd, hi - mean)]).clip(min=0)


def prune_sweep_figure(sweep_paths: Sequence[str], out_png: str) -> None:
    plt = _plt()
    df = pd.DataFrame([row for p in sweep_paths for row in read_json(p)])
    groups = list(df.groupby(["dataset", "model", "attack"]))
    fig, axes = plt.subplots(1, len(groups), squeeze=False, figsize=(5 * len(groups), 3.9), layout="constrained")
    for ax, ((ds, model, attack), g) in zip(axes[0], groups):
        stats = g.groupby("prune_rate").agg(ca=("ca", "mean"), ca_sd=("ca", "std"), asr=("asr", "mean"),
                                            asr_sd=("asr", "std")).reset_index()
        for metric, style in (("asr", dict(marker="o")), ("ca", dict(marker="s", ls="--"))):
            err = _clipped_err(stats[metric], stats[f"{metric}_sd"], 0, 100)
            ax.errorbar(stats.prune_rate, stats[metric], yerr=err, label=metric.upper(), capsize=3, **style)
        runs = g.seed.nunique()
        ax.set_title(f"{ds} · {model} · {attack} ({runs} run{'s' if runs != 1 else ''})")
        ax.set_xlabel("channels pruned per expert (%), before fine-tuning")
        ax.set_ylabel("%")
        ax.set_ylim(-3, 103)
        ax.grid(alpha=0.4)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=len(labels), title="mean ± std over runs",
               title_fontsize=9, fontsize=9)
    _savefig(fig, out_png)
    plt.close(fig)


def patch_map_figure(maps_json: str, out_png: str, title: str) -> None:
    """One row per (model, image): the input image, each expert's 8x8 map of routed positions, and how many
    experts receive each position."""
    plt = _plt()
    rows = read_json(maps_json)["rows"]
    n_exp = len(rows[0]["maps"])
    fig, axes = _image_grid(plt, len(rows), n_exp + 2, (2.0, 2.0))
    for i, row in enumerate(rows):
        maps = np.asarray(row["maps"])
        ax = axes[i, 0]
        ax.imshow(np.asarray(row["image"], dtype=np.uint8), interpolation="nearest")
        ax.set_title(f"{row['model']}\n{row['class']}" + (" (triggered)" if row["triggered"] else ""), fontsize=8)
        ax.axis("off")
        for e in range(n_exp):
            ax = axes[i, e + 1]
            im = ax.imshow(maps[e], cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
            ax.set_title(f"Expert {e + 1}", fontsize=9)
            ax.set_xticks(range(0, 8, 2))
            ax.set_yticks(range(0, 8, 2))
            ax.tick_params(labelsize=7)
        ax = axes[i, -1]
        im = ax.imshow(maps.sum(0), cmap="viridis", vmin=0, vmax=n_exp, interpolation="nearest")
        ax.set_title("experts per patch", fontsize=9)
        ax.tick_params(labelsize=7)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, ticks=range(n_exp + 1))
    fig.suptitle(title + "\n(blue: the 16 patch positions routed to the expert; position = 8 x row + column)",
                 fontsize=11)
    _savefig(fig, out_png)
    plt.close(fig)


def patch_value_figure(maps_json: str, out_png: str, title: str) -> None:
    """Per model and expert: histogram (10 bins) of the patch sums (4x4x3 values in [0, 1], 0 to 48) of the
    positions the expert receives, pooled over the chosen images (the authors' Fig. 5 uses one image)."""
    plt = _plt()
    rows = read_json(maps_json)["rows"]
    models = list(dict.fromkeys(r["model"] for r in rows))
    n_exp = len(rows[0]["maps"])
    fig, axes = plt.subplots(len(models), n_exp, figsize=(3.0 * n_exp, 2.3 * len(models)), squeeze=False,
                             sharex=True, layout="constrained")
    for i, model in enumerate(models):
        mine = [r for r in rows if r["model"] == model]
        for e in range(n_exp):
            vals = np.concatenate([np.asarray(r["patch_sums"]).ravel()[r["selected"][e]] for r in mine])
            ax = axes[i, e]
            ax.hist(vals, bins=10, range=(0, 48), color=f"C{e}", edgecolor="white")
            ax.set_title(f"{model} · Expert {e + 1}", fontsize=9)
            if i == len(models) - 1:
                ax.set_xlabel("patch value (sum of 48 values in [0, 1])", fontsize=8)
            if e == 0:
                ax.set_ylabel("patches received")
    fig.suptitle(title, fontsize=11)
    _savefig(fig, out_png)
    plt.close(fig)


def trigger_examples_figure(images: np.ndarray, labels: Sequence[str], triggered: dict[str, np.ndarray],
                            out_png: str, title: str, diff_gain: float = 8.0) -> None:
    """Clean images and each trigger applied (the paper's Fig. 2), with the amplified difference per trigger."""
    plt = _plt()
    names = list(triggered)
    cols = 1 + 2 * len(names)
    fig, axes = _image_grid(plt, len(images), cols, (1.9, 2.0))
    for i, img in enumerate(images):
        axes[i, 0].imshow(img, interpolation="nearest")
        axes[i, 0].set_title(f"clean\n{labels[i]}", fontsize=8)
        for j, name in enumerate(names):
            t = triggered[name][i]
            axes[i, 1 + 2 * j].imshow(t, interpolation="nearest")
            axes[i, 1 + 2 * j].set_title(name, fontsize=9)
            diff = np.clip(np.abs(t.astype(np.int16) - img.astype(np.int16)) * diff_gain, 0, 255).astype(np.uint8)
            axes[i, 2 + 2 * j].imshow(diff, interpolation="nearest")
            axes[i, 2 + 2 * j].set_title(f"|{name} − clean| ×{diff_gain:g}", fontsize=8)
    for ax in axes.ravel():  # ticks off, frame kept: a difference image's white edge stays visible
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title, fontsize=11)
    _savefig(fig, out_png)
    plt.close(fig)


def routing_stats_figure(summary_csv: str, out_png: str) -> None:
    """Per (dataset, model, trigger): how often the trigger patch is routed, against the model's poisoning rate.
    The models are categories (clean, then each rate), evenly spaced and labelled as such; error bars are ± std
    over seeds cut at the quantity's valid range."""
    plt = _plt()
    df = pd.read_csv(summary_csv)
    df["rate"] = [parse_attack(a)[1] for a in df.attack]
    n_exp = sum(c.startswith("expert") and c.endswith("_mean") for c in df.columns)
    groups = list(df.groupby(["dataset", "model", "trigger"]))
    fig, axes = plt.subplots(len(groups), 2, figsize=(10, 3.5 * len(groups) + 0.4), squeeze=False,
                             layout="constrained")
    for i, ((ds, model, trig), g) in enumerate(groups):
        rates = sorted(g.rate.unique())
        pos = {r: k for k, r in enumerate(rates)}
        for j, (metric, label, hi) in enumerate([("reached_fraction", "trigger patch reaches ≥1 expert (%)", 100),
                                                 ("mean_experts", "experts receiving the trigger patch", n_exp)]):
            ax = axes[i, j]
            for k, (images, style) in enumerate((("triggered", "-o"), ("untriggered", "--s"))):
                sub = g[g.images == images].sort_values("rate")
                x = np.array([pos[r] for r in sub.rate]) + (k - 0.5) * 0.08  # dodged: bars side by side
                ax.errorbar(x, sub[f"{metric}_mean"], yerr=_clipped_err(sub[f"{metric}_mean"], sub[f"{metric}_std"],
                                                                        0, hi),
                            fmt=style, capsize=3, label=f"{images} test images")
            ax.set_xticks(range(len(rates)), ["clean" if r == 0 else f"{r:g} %" for r in rates])
            ax.set_xlim(-0.4, len(rates) - 0.6)
            ax.set_xlabel("model: its poisoning rate (categories, evenly spaced)")
            ax.set_ylabel(label)
            ax.set_ylim(-0.03 * hi, 1.03 * hi)
            ax.set_title(f"{ds} · {model} · {trig} trigger")
            ax.grid(alpha=0.3)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=2, fontsize=9,
               title="mean ± std over seeds", title_fontsize=9)
    _savefig(fig, out_png)
    plt.close(fig)


def nc_mask_figure(entries: Sequence[tuple[str, str, np.ndarray | None]], target: int, out_png: str,
                   title: str) -> None:
    """Reversed trigger of the target class per model and precision, beside the real trigger's footprint.

    ``entries``: (label, masks safetensors path, real trigger footprint |triggered - clean| or None)."""
    from ..io import load_tensors

    plt = _plt()
    fig, axes = _image_grid(plt, len(entries), 3, (2.4, 2.3))
    for i, (label, path, footprint) in enumerate(entries):
        masks, _ = load_tensors(path)
        mask, pattern = masks[f"mask_{target}"].numpy(), masks[f"pattern_{target}"].numpy()
        ax = axes[i, 0]
        if footprint is not None:
            ax.imshow(footprint, cmap="magma", interpolation="nearest")
            ax.set_title(f"{label}\nreal trigger |x' − x|", fontsize=8)
        else:
            ax.set_title(label, fontsize=8)
            ax.text(0.5, 0.5, "clean model:\nno trigger", ha="center", va="center", fontsize=8, color="0.4",
                    transform=ax.transAxes)
        im = axes[i, 1].imshow(mask, cmap="magma", vmin=0, vmax=1, interpolation="nearest")
        axes[i, 1].set_title(f"reversed mask, class {target}\nL1 {mask.sum():.1f}", fontsize=8)
        fig.colorbar(im, ax=axes[i, 1], fraction=0.046, pad=0.04)
        axes[i, 2].imshow(np.clip(mask[None] * pattern, 0, 1).transpose(1, 2, 0), interpolation="nearest")
        axes[i, 2].set_title("mask × pattern", fontsize=8)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title, fontsize=10)
    _savefig(fig, out_png)
    plt.close(fig)


def trigger_footprint(data_path: str, trigger_path: str, target: int = 0, images: int = 64) -> np.ndarray:
    """Mean |triggered - clean| over the first non-target test images, summed over channels (32 x 32)."""
    import torch

    from ..attacks.triggers import load_trigger
    from ..data.datasets import load_npz

    ds = load_npz(data_path)
    x = torch.from_numpy(ds.x_test[ds.y_test != target][:images])
    diff = (load_trigger(trigger_path).apply(x).float() - x.float()).abs()
    return diff.mean(0).sum(-1).numpy()
