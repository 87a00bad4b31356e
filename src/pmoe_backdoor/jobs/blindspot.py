"""Blindspot stage: STRIP, Activation Clustering and Spectral Signatures on each model as deployed, and
the quantization-blindspot table of all five defenses at every precision."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from ..attacks.poison import PoisonRecord
from ..attacks.triggers import load_trigger
from ..defenses.activation_clustering import activation_clustering, penultimate_features
from ..defenses.spectral_signatures import spectral_signatures
from ..defenses.strip import strip_defense
from ..deployment.quantize import quantize_model
from ..io import write_json
from ..reporting.blindspot import blindspot_figure, blindspot_table
from ..runtime import derived_seed
from .common import JobData, RunId
from .deploy import calibration_images
from .train import training_set

__all__ = ["activation_clustering_job", "blindspot_figure", "blindspot_table", "spectral_signatures_job",
           "strip_job"]


def _deployed(job: JobData, weights: str, precision: str, calibration: int, seed: int) -> torch.nn.Module:
    model, _ = job.load_model(weights)
    return quantize_model(model, precision, calibration_images(job, calibration, seed))


def strip_job(data_path: str, weights: str, precision: str, triggers: dict[str, str], out: str,
              strip_cfg: dict[str, Any], calibration: int, target: int, device: str, run: RunId) -> dict:
    """STRIP on the model as deployed at ``precision``. The test set is split by a seeded shuffle: the first
    ``holdout`` images are the defender's held-out clean set (overlay pool and threshold), the next ``test_images``
    measure the FRR, and the non-target ones among them, with each trigger of ``triggers``, the FAR."""
    job = JobData.open(data_path, device)
    held, tested = int(strip_cfg["holdout"]), int(strip_cfg["test_images"])
    if held + tested > len(job.y_test):
        raise ValueError(f"strip.holdout + strip.test_images = {held + tested} exceeds the {len(job.y_test)} test "
                         f"images of {data_path}")
    if not triggers:
        raise ValueError("strip: no trigger file to make triggered inputs with")
    qmodel = _deployed(job, weights, precision, calibration, run.seed)
    order = torch.from_numpy(np.random.default_rng(derived_seed(run.seed, "strip-split")).permutation(len(job.y_test)))
    holdout, test_idx = job.x_test[order[:held]], order[held:held + tested]
    clean_test = job.x_test[test_idx]
    non_target = clean_test[job.y_test[test_idx] != target]
    triggered = {name: load_trigger(path).apply(non_target) for name, path in triggers.items()}
    t0 = time.perf_counter()
    result = strip_defense(qmodel, holdout, clean_test, triggered, int(strip_cfg["overlays"]),
                           float(strip_cfg["frr"]), float(strip_cfg["flag_rate"]), derived_seed(run.seed, "strip"),
                           strip_cfg["superimpose"], int(strip_cfg["batch_size"]), job.device,
                           strip_cfg.get("threshold", "empirical"))
    summary = {**run.as_dict(), "defense": "STRIP", "precision": precision, "target": target, "holdout": held,
               "test_images": tested, "seconds": time.perf_counter() - t0, "config": dict(strip_cfg), **result}
    write_json(out, summary)
    print({k: summary[k] for k in ("threshold", "frr", "detection", "flagged")})
    return summary


def _training_features(job: JobData, weights: str, poison_path: str, precision: str, calibration: int,
                       batch_size: int, run: RunId) -> tuple[torch.Tensor, torch.Tensor, np.ndarray, int | None]:
    """Penultimate features of the training set the model was trained on (poisoned for an attack), computed by the
    model as deployed; its labels, the true poisoned indices and the poison target (None if nothing poisoned)."""
    qmodel = _deployed(job, weights, precision, calibration, run.seed)
    x, y = training_set(job, poison_path)
    rec = PoisonRecord.load(poison_path)
    feats = penultimate_features(qmodel, x, batch_size, job.device)
    return feats, y, rec.indices.numpy(), (rec.target if len(rec.indices) else None)


def activation_clustering_job(data_path: str, weights: str, poison_path: str, precision: str, out: str,
                              ac_cfg: dict[str, Any], calibration: int, device: str, run: RunId) -> dict:
    """Activation Clustering of the training set, with the features of the model as deployed at ``precision``."""
    job = JobData.open(data_path, device)
    t0 = time.perf_counter()
    feats, y, poisoned, target = _training_features(job, weights, poison_path, precision, calibration,
                                                    int(ac_cfg.get("batch_size", 500)), run)
    result = activation_clustering(feats, y, poisoned, int(ac_cfg["dims"]), float(ac_cfg["size_threshold"]),
                                   float(ac_cfg["silhouette_threshold"]), derived_seed(run.seed, "ac"),
                                   int(ac_cfg["restarts"]), int(ac_cfg["silhouette_samples"]))
    summary = {**run.as_dict(), "defense": "Activation Clustering", "precision": precision, "target": target,
               "feature_dims": feats.shape[1], "poisoned": len(poisoned), "seconds": time.perf_counter() - t0,
               "config": dict(ac_cfg), **result}
    write_json(out, summary)
    print({k: summary[k] for k in ("flagged_labels", "poison_precision", "poison_recall")})
    return summary


def spectral_signatures_job(data_path: str, weights: str, poison_path: str, precision: str, out: str,
                            ss_cfg: dict[str, Any], calibration: int, device: str, run: RunId) -> dict:
    """Spectral Signatures of the training set, with the features of the model as deployed at ``precision``;
    ``epsilon: null`` takes the true poisoned share of the target label (0 for a clean model: nothing removed)."""
    job = JobData.open(data_path, device)
    t0 = time.perf_counter()
    feats, y, poisoned, target = _training_features(job, weights, poison_path, precision, calibration,
                                                    int(ss_cfg.get("batch_size", 500)), run)
    epsilon = ss_cfg.get("epsilon")
    if epsilon is None:
        epsilon = len(poisoned) / int((y == target).sum()) if target is not None else 0.0
    result = spectral_signatures(feats, y, poisoned, float(epsilon), float(ss_cfg["removal"]),
                                 float(ss_cfg["anomaly_threshold"]))
    summary = {**run.as_dict(), "defense": "Spectral Signatures", "precision": precision, "target": target,
               "feature_dims": feats.shape[1], "poisoned": len(poisoned), "seconds": time.perf_counter() - t0,
               "config": dict(ss_cfg), **result}
    write_json(out, summary)
    print({k: summary[k] for k in ("flagged_labels", "epsilon", "poison_recall")})
    return summary
