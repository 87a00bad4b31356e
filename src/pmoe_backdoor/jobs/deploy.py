"""Deploy stage: every model as deployed (fp32 / int8 / int4), and Neural Cleanse on each deployed model."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..deployment.quantize import quantize_model, routing_change
from ..evaluate import evaluate
from ..io import write_json
from ..models.routing import routing_indices
from ..reporting.figures import nc_mask_figure, trigger_footprint
from ..reporting.summaries import detection_table, precision_table
from .common import JobData, RunId
from .wrapper import JobContext

__all__ = ["DeployEvalJob", "deploy_eval_job", "detection_table", "nc_mask_entries", "nc_mask_figure",
           "precision_table", "trigger_footprint"]


def calibration_images(job: JobData, count: int, seed: int) -> torch.Tensor:
    """The deployer's calibration set: ``count`` clean training images after a seeded shuffle."""
    return job.shuffled_train_images(count, seed, "calibration")


@dataclass(frozen=True)
class DeployEvalJob:
    """One model as deployed at each of ``precisions`` (int8 calibrated on ``calibration`` clean training images);
    ``fine_pruned`` names the Fine-Pruning that made the model ("authors 30 %"), None for a trained one."""

    data: str
    weights: str
    precisions: list[str]
    out: str
    trigger: str | None
    calibration: int
    target: int
    batch_size: int
    device: str
    run: RunId
    fine_pruned: str | None = None

    @classmethod
    def from_context(cls, job: JobContext) -> DeployEvalJob:
        i, p, w = job.input, job.params, job.wildcards
        return cls(i.data, i.weights, list(p.precisions), job.output[0], trigger=i.trigger or None,
                   calibration=p.calibration, target=p.target, batch_size=p.batch_size, device=job.device,
                   run=job.run, fine_pruned=f"{w.variant} {w.prune} %" if "variant" in w.keys() else None)


def deploy_eval_job(spec: DeployEvalJob) -> list[dict]:
    """BA and ASR of the model as deployed at each precision; for pmoe models, the share of top-k routing
    positions that differ from the fp32 model on the clean and the triggered test images."""
    calibration, target = spec.calibration, spec.target
    job = JobData.open(spec.data, spec.device)
    model, _ = job.load_model(spec.weights)
    calib = calibration_images(job, calibration, spec.run.seed)
    x_asr = job.asr_images(spec.trigger, target)
    is_pmoe = getattr(model, "moe", None) is not None
    if is_pmoe:
        ref_clean = routing_indices(model, job.x_test, device=job.device)
        ref_trig = routing_indices(model, x_asr, device=job.device) if x_asr is not None else None
    identity = {**spec.run.as_dict(), **({"fine_pruned": spec.fine_pruned} if spec.fine_pruned else {})}
    results = []
    for precision in spec.precisions:
        qmodel = quantize_model(model, precision, calib)
        metrics = evaluate(qmodel, job.x_test, job.y_test, x_asr, target, job.num_classes, spec.batch_size,
                           device=job.device)
        result = {**identity, "precision": precision, "calibration_images": calibration if precision == "int8" else 0,
                  **{k: metrics[k] for k in ("ba", "asr", "test_loss") if k in metrics}}
        if is_pmoe:
            routed = routing_indices(qmodel, job.x_test, device=job.device)
            result["routing_change_clean"] = routing_change(ref_clean, routed)
            if x_asr is not None:
                routed = routing_indices(qmodel, x_asr, device=job.device)
                result["routing_change_triggered"] = routing_change(ref_trig, routed)
        print(result)
        results.append(result)
    write_json(spec.out, results)
    return results


def nc_mask_entries(data_path: str, labels: list[str], masks: list[str], triggers: list[str | None],
                    target: int) -> list[tuple[str, str, np.ndarray | None]]:
    """The detection figure's rows (nc_mask_figure): each label with its masks file and the footprint of the model's
    real trigger (None for a clean model)."""
    return [(label, mask, trigger_footprint(data_path, trigger, target) if trigger else None)
            for label, mask, trigger in zip(labels, masks, triggers)]
