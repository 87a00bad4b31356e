"""Analysis stage: routing (patch selection) of chosen images and over the test set; the paper's Figures 2-6."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..attacks.triggers import load_trigger
from ..io import write_json
from ..models.routing import patch_grid, patch_sums, routing_indices, trigger_patch_stats, trigger_positions
from ..reporting.figures import patch_map_figure, patch_value_figure, routing_stats_figure, trigger_examples_figure
from ..reporting.summaries import routing_stats_table
from .common import JobData, RunId

__all__ = ["first_of_classes", "patch_map_figure", "patch_value_figure", "routing_maps_job", "routing_stats_figure",
           "routing_stats_job", "routing_stats_table", "trigger_examples_job"]


def first_of_classes(y: np.ndarray, classes: list[int], origin: str) -> list[int]:
    """The index of the first test image of each listed class."""
    out = []
    for c in classes:
        hits = np.flatnonzero(y == c)
        if not len(hits):
            raise ValueError(f"{origin}: class {c} has no test image (classes 0..{int(y.max())})")
        out.append(int(hits[0]))
    return out


def routing_stats_job(data_path: str, weights: str, triggers: dict[str, str], out: str, target: int, device: str,
                      run: RunId) -> dict:
    """For each square trigger: how often its patch reaches the experts, on the triggered non-target test
    images and on the same images without the trigger."""
    job = JobData.open(data_path, device)
    model, _ = job.load_model(weights)
    x = job.x_test[job.y_test != target]
    clean_idx = routing_indices(model, x, device=job.device)
    result: dict[str, Any] = {**run.as_dict(), "triggers": {}}
    for name, path in triggers.items():
        trig = load_trigger(path)
        positions = trigger_positions(trig)
        trig_idx = routing_indices(model, trig.apply(x), device=job.device)
        result["triggers"][name] = {"positions": positions,
                                    "triggered": trigger_patch_stats(trig_idx, positions),
                                    "untriggered": trigger_patch_stats(clean_idx, positions)}
    write_json(out, result)
    print({k: v["triggered"]["reached_fraction"] for k, v in result["triggers"].items()})
    return result


def routing_maps_job(data_path: str, models: dict[str, dict[str, str | None]], classes: list[int], out: str,
                     device: str) -> dict:
    """Routing of the chosen test images under each model: ``models`` maps a label to {weights, trigger}; a
    model with a trigger sees the triggered image. Stores the images, the (E, 8, 8) maps and patch sums."""
    job = JobData.open(data_path, device)
    picks = first_of_classes(job.dataset.y_test, classes, data_path)
    x = job.x_test[torch.tensor(picks)]
    rows = []
    for label, spec in models.items():
        model, _ = job.load_model(spec["weights"])
        images = load_trigger(spec["trigger"]).apply(x) if spec.get("trigger") else x
        idx = routing_indices(model, images, device=job.device)
        for i, test_index in enumerate(picks):
            rows.append({"model": label, "test_index": test_index,
                         "class": str(job.dataset.classes[job.dataset.y_test[test_index]]),
                         "triggered": bool(spec.get("trigger")), "image": images[i].tolist(),
                         "maps": patch_grid(idx[i]).tolist(), "patch_sums": patch_sums(images[i]).tolist(),
                         "selected": idx[i].tolist()})
    result = {"dataset": str(Path(data_path).stem), "rows": rows}
    write_json(out, result)
    return result


def trigger_examples_job(data_path: str, triggers: dict[str, str], classes: list[int], out_png: str,
                         title: str) -> None:
    job = JobData.open(data_path, "cpu")
    picks = first_of_classes(job.dataset.y_test, classes, data_path)
    x = job.x_test[torch.tensor(picks)]
    triggered = {name: load_trigger(path).apply(x).numpy() for name, path in triggers.items()}
    labels = [str(job.dataset.classes[job.dataset.y_test[i]]) for i in picks]
    trigger_examples_figure(x.numpy(), labels, triggered, out_png, title)
