"""Routing figures (the paper's Figures 2-6) and the routing-statistics table."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

from .io import atomic_path, read_json
from .report import _pm, _savefig, write_latex, write_markdown


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    sns.set_theme(style="white", context="notebook")
    return plt


def _title_and_layout(fig, title: str, fontsize: int = 11) -> None:
    """A suptitle with room kept for it: plain tight_layout would let it overlap the first row."""
    lines = title.count("\n") + 1
    fig.suptitle(title, fontsize=fontsize)
    fig.tight_layout(rect=(0, 0, 1, 1 - (0.25 + 0.2 * lines) / fig.get_figheight()))


def patch_map_figure(maps_json: str, out_png: str, title: str) -> None:
    """One row per (model, image): the input image, each expert's 8x8 map of routed positions, and how many
    experts receive each position."""
    plt = _plt()
    rows = read_json(maps_json)["rows"]
    n_exp = len(rows[0]["maps"])
    fig, axes = plt.subplots(len(rows), n_exp + 2, figsize=(2.0 * (n_exp + 2), 2.1 * len(rows)), squeeze=False)
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
    _title_and_layout(fig, title + "\n(blue: the 16 patch positions routed to the expert; position = 8 x row + column)")
    _savefig(fig, out_png)
    plt.close(fig)


def patch_value_figure(maps_json: str, out_png: str, title: str) -> None:
    """Per model and expert: histogram (10 bins) of the patch sums (4x4x3 values in [0, 1], 0 to 48) of the
    positions the expert receives, pooled over the chosen images (the authors' Fig. 5 uses one image)."""
    plt = _plt()
    rows = read_json(maps_json)["rows"]
    models = list(dict.fromkeys(r["model"] for r in rows))
    n_exp = len(rows[0]["maps"])
    fig, axes = plt.subplots(len(models), n_exp, figsize=(3.0 * n_exp, 2.4 * len(models)), squeeze=False,
                             sharex=True)
    for i, model in enumerate(models):
        mine = [r for r in rows if r["model"] == model]
        for e in range(n_exp):
            vals = np.concatenate([np.asarray(r["patch_sums"]).ravel()[r["selected"][e]] for r in mine])
            ax = axes[i, e]
            ax.hist(vals, bins=10, range=(0, 48), color=f"C{e}", edgecolor="white")
            ax.set_title(f"{model} · Expert {e + 1}", fontsize=9)
            ax.set_xlabel("patch value (sum of 48 values in [0,1])", fontsize=8)
            if e == 0:
                ax.set_ylabel("frequency")
    _title_and_layout(fig, title)
    _savefig(fig, out_png)
    plt.close(fig)


def trigger_examples_figure(images: np.ndarray, labels: Sequence[str], triggered: dict[str, np.ndarray],
                            out_png: str, title: str, diff_gain: float = 8.0) -> None:
    """Clean images and each trigger applied (the paper's Fig. 2), with the amplified difference per trigger."""
    plt = _plt()
    names = list(triggered)
    cols = 1 + 2 * len(names)
    fig, axes = plt.subplots(len(images), cols, figsize=(1.9 * cols, 2.0 * len(images)), squeeze=False)
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
    _title_and_layout(fig, title)
    _savefig(fig, out_png)
    plt.close(fig)


def routing_stats_table(stat_paths: Sequence[str], out_csv: str, out_md: str, out_tex: str) -> pd.DataFrame:
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
    with atomic_path(out_csv) as tmp:
        summary.to_csv(tmp, index=False)
    experts = [c for c in value_cols if c.startswith("expert")]
    header = ["Dataset", "Model", "Trigger", "Model trained on", "Images", "Seeds", "Patch reaches ≥1 expert %",
              "Experts receiving it"] + [f"E{c[6:]} %" for c in experts]
    body = [[r["dataset"], r["model"], r["trigger"], r["attack"], r["images"], str(r["seeds"]),
             _pm(r["reached_fraction_mean"], r["reached_fraction_std"]),
             _pm(r["mean_experts_mean"], r["mean_experts_std"], 2)]
            + [_pm(r[f"{c}_mean"], r[f"{c}_std"]) for c in experts] for r in summary.to_dict("records")]
    title = ("Routing of the square trigger's patch over the non-target test set: share of images whose trigger "
             "patch reaches at least one expert, the mean number of experts receiving it, and per expert the share "
             "of images; mean ± std over seeds")
    write_markdown(out_md, header, body, title)
    write_latex(out_tex, header, body, title)
    return summary


def routing_stats_figure(summary_csv: str, out_png: str) -> None:
    plt = _plt()
    df = pd.read_csv(summary_csv)
    df["rate"] = [0.0 if a == "clean" else float(a.rsplit("-", 1)[1]) for a in df.attack]
    groups = list(df.groupby(["dataset", "model", "trigger"]))
    fig, axes = plt.subplots(len(groups), 2, figsize=(10, 3.4 * len(groups)), squeeze=False)
    for (ds, model, trig), g in groups:
        i = groups.index(((ds, model, trig), g))
        for j, (metric, label) in enumerate([("reached_fraction", "trigger patch reaches ≥1 expert (%)"),
                                             ("mean_experts", "experts receiving the trigger patch")]):
            ax = axes[i, j]
            for images, style in (("triggered", "-o"), ("untriggered", "--s")):
                sub = g[g.images == images].sort_values("rate")
                ax.errorbar(sub.rate.astype(str), sub[f"{metric}_mean"], yerr=sub[f"{metric}_std"].fillna(0),
                            fmt=style, capsize=3, label=f"{images} test images")
            ax.set_xlabel("poisoning rate of the model (%; 0 = clean model)")
            ax.set_ylabel(label)
            ax.set_title(f"{ds} · {model} · {trig} trigger")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    _savefig(fig, out_png)
    plt.close(fig)


def nc_mask_figure(entries: Sequence[tuple[str, str, np.ndarray | None]], target: int, out_png: str,
                   title: str) -> None:
    """Reversed trigger of the target class per model and precision, beside the real trigger's footprint.

    ``entries``: (label, masks safetensors path, real trigger footprint |triggered - clean| or None)."""
    from .io import load_tensors

    plt = _plt()
    fig, axes = plt.subplots(len(entries), 3, figsize=(7.2, 2.3 * len(entries)), squeeze=False)
    for i, (label, path, footprint) in enumerate(entries):
        masks, _ = load_tensors(path)
        mask, pattern = masks[f"mask_{target}"].numpy(), masks[f"pattern_{target}"].numpy()
        ax = axes[i, 0]
        if footprint is not None:
            ax.imshow(footprint, cmap="magma", interpolation="nearest")
            ax.set_title(f"{label}\nreal trigger |x' − x|", fontsize=8)
        else:
            ax.set_title(f"{label}\n(no trigger)", fontsize=8)
        im = axes[i, 1].imshow(mask, cmap="magma", vmin=0, vmax=1, interpolation="nearest")
        axes[i, 1].set_title(f"reversed mask, class {target}\nL1 {mask.sum():.1f}", fontsize=8)
        fig.colorbar(im, ax=axes[i, 1], fraction=0.046, pad=0.04)
        axes[i, 2].imshow(np.clip(mask[None] * pattern, 0, 1).transpose(1, 2, 0), interpolation="nearest")
        axes[i, 2].set_title("mask × pattern", fontsize=8)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    _title_and_layout(fig, title, fontsize=10)
    _savefig(fig, out_png)
    plt.close(fig)


def trigger_footprint(data_path: str, trigger_path: str, target: int = 0, images: int = 64) -> np.ndarray:
    """Mean |triggered - clean| over the first non-target test images, summed over channels (32 x 32)."""
    import torch

    from .data import load_npz
    from .triggers import load_trigger

    ds = load_npz(data_path)
    x = torch.from_numpy(ds.x_test[ds.y_test != target][:images])
    diff = (load_trigger(trigger_path).apply(x).float() - x.float()).abs()
    return diff.mean(0).sum(-1).numpy()
