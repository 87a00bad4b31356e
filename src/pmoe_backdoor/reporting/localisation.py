"""The localisation figure: for a few triggered inputs of each attacked model, the trigger's true footprint beside
where the router-guided and the Grad-CAM-guided patch ablation look, and where occluding one patch actually lowers
the prediction (the maps of :mod:`pmoe_backdoor.defenses.localisation_maps`)."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from ..io import load_tensors
from .figures import _image_grid, _plt, _savefig

# map name -> column title; the ranking columns come from each mapping defense's own file
COLUMNS = (("images", "triggered input"), ("footprint", "trigger footprint"), ("router_ablation", "router score"),
           ("saliency_ablation", "Grad-CAM score"), ("occlusion", "occlusion effect"))


def _normalised(m: np.ndarray) -> np.ndarray:
    """A map scaled to [0, 1] for display (a constant map is shown as zeros)."""
    lo, hi = float(m.min()), float(m.max())
    return (m - lo) / (hi - lo) if hi > lo else np.zeros_like(m)


def load_maps(entry: dict[str, Any]) -> dict[str, np.ndarray]:
    """One entry's maps: the images, footprint and occlusion effect (from its first map file) and each mapping
    defense's ranking map under that defense's name."""
    out: dict[str, np.ndarray] = {}
    for defense, path in entry["maps"].items():
        tensors, _ = load_tensors(path)
        if not tensors:  # a clean model's or an input-less job's empty file
            continue
        for key in ("images", "footprint", "occlusion"):
            out.setdefault(key, tensors[key].numpy())
        out[defense] = tensors["ranking"].numpy()
    return out


def draw_localisation_figure(entries: Sequence[dict[str, Any]], inputs: int = 2):
    """``inputs`` rows per entry (a model and trigger): the triggered input, then each map on the 8x8 grid of
    4x4-pixel patches, each scaled to its own range (white: highest); a column whose defense did not run on that
    model (the router test on a dense model) is left blank."""
    plt = _plt()
    rows = [(entry, maps, i) for entry in entries if (maps := load_maps(entry))
            for i in range(min(inputs, len(maps["images"])))]
    if not rows:
        raise ValueError("no localisation maps to draw (every map file is empty)")
    fig, axes = _image_grid(plt, len(rows), len(COLUMNS), (1.7, 1.8))
    for r, (entry, maps, i) in enumerate(rows):
        for c, (key, title) in enumerate(COLUMNS):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(title, fontsize=9)
            if c == 0:
                ax.set_ylabel(f"{entry['model']}\n{entry['trigger']}-{entry['rate']} #{i}", fontsize=8)
            if key not in maps:
                ax.set_frame_on(False)
                continue
            if key == "images":
                ax.imshow(maps[key][i])
            else:
                ax.imshow(_normalised(maps[key][i]), cmap="magma", vmin=0, vmax=1, interpolation="nearest")
    precisions = sorted({e["precision"] for e in entries})
    fig.suptitle(f"Localisation of the trigger (seed 0, {', '.join(precisions)}): true footprint, the defenses' "
                 "rankings, single-patch occlusion", fontsize=10)
    return fig


def localisation_figure(entries: Sequence[dict[str, Any]], out_png: str, inputs: int = 2) -> None:
    fig = draw_localisation_figure(entries, inputs)
    _savefig(fig, out_png)
    _plt().close(fig)
