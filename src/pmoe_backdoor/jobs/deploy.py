"""Deploy stage: every model as deployed (fp32 / int8 / int4), and Neural Cleanse on each deployed model."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from ..defenses.neural_cleanse import NCConfig, neural_cleanse
from ..deployment.quantize import quantize_model, routing_change
from ..evaluate import evaluate
from ..io import save_tensors, write_json
from ..models.routing import routing_indices
from ..reporting.figures import nc_mask_figure, trigger_footprint
from ..reporting.summaries import detection_table, precision_table
from ..runtime import derived_seed
from .common import JobData, RunId

__all__ = ["deploy_eval_job", "detection_table", "nc_mask_figure", "neural_cleanse_job", "precision_table",
           "trigger_footprint"]


def calibration_images(job: JobData, count: int, seed: int) -> torch.Tensor:
    """The deployer's calibration set: ``count`` clean training images after a seeded shuffle."""
    return job.shuffled_train_images(count, seed, "calibration")


def deploy_eval_job(data_path: str, weights: str, precisions: list[str], out: str, trigger_path: str | None,
                    calibration: int, target: int, batch_size: int, device: str, run: RunId,
                    fine_pruned: str | None = None) -> list[dict]:
    """BA and ASR of the model as deployed at each precision; for pmoe models, the share of top-k routing
    positions that differ from the fp32 model on the clean and the triggered test images."""
    job = JobData.open(data_path, device)
    model, _ = job.load_model(weights)
    calib = calibration_images(job, calibration, run.seed)
    x_asr = job.asr_images(trigger_path, target)
    is_pmoe = getattr(model, "moe", None) is not None
    if is_pmoe:
        ref_clean = routing_indices(model, job.x_test, device=job.device)
        ref_trig = routing_indices(model, x_asr, device=job.device) if x_asr is not None else None
    identity = {**run.as_dict(), **({"fine_pruned": fine_pruned} if fine_pruned else {})}
    results = []
    for precision in precisions:
        qmodel = quantize_model(model, precision, calib)
        metrics = evaluate(qmodel, job.x_test, job.y_test, x_asr, target, job.num_classes, batch_size,
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
    write_json(out, results)
    return results


def neural_cleanse_job(data_path: str, weights: str, precision: str, out: str, out_masks: str,
                       nc_cfg: dict[str, Any], classes: int | None, images: int, calibration: int, target: int,
                       device: str, run: RunId) -> dict:
    """Neural Cleanse on the model as deployed at ``precision``, with ``images`` clean test images."""
    job = JobData.open(data_path, device)
    model, _ = job.load_model(weights)
    qmodel = quantize_model(model, precision, calibration_images(job, calibration, run.seed))
    order = np.random.default_rng(derived_seed(run.seed, "nc-images")).permutation(len(job.y_test))
    x = job.x_test[torch.from_numpy(order[:images])]
    class_list = list(range(job.num_classes if classes is None else min(classes, job.num_classes)))
    t0 = time.perf_counter()
    summary, masks = neural_cleanse(qmodel, x, class_list, NCConfig.from_dict(nc_cfg),
                                    seed=derived_seed(run.seed, "nc"), device=job.device)
    summary = {**run.as_dict(), "precision": precision, "target": target, "images": len(x),
               "seconds": time.perf_counter() - t0, **summary,
               "detected_target": summary["flagged"] and summary["flagged_class"] == target}
    save_tensors(out_masks, masks, {"classes": class_list})
    write_json(out, summary)
    print({k: summary[k] for k in ("flagged", "flagged_class", "seconds")})
    return summary
