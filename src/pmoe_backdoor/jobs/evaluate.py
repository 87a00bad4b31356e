"""Evaluate stage: BA, ASR and per-class accuracy of one trained model."""

from __future__ import annotations

from ..evaluate import evaluate
from ..io import write_json
from .common import JobData, RunId


def evaluate_job(data_path: str, weights: str, out: str, trigger_path: str | None, target: int, batch_size: int,
                 device: str, run: RunId) -> dict:
    job = JobData.open(data_path, device)
    model, _ = job.load_model(weights)
    metrics = evaluate(model, job.x_test, job.y_test, job.asr_images(trigger_path, target), target,
                       job.num_classes, batch_size, device=job.device)
    metrics = {**run.as_dict(), **metrics, "classes": [str(c) for c in job.dataset.classes]}
    write_json(out, metrics)
    print({k: metrics[k] for k in ("ba", "asr") if k in metrics})
    return metrics
