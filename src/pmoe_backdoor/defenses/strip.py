"""STRIP (Gao et al., ACSAC 2019): run-time detection of triggered inputs by superimposing clean images.

Each input is superimposed with ``overlays`` clean images drawn from a held-out pool; a backdoored model keeps
predicting the target for a triggered input whatever is laid over it, so the entropy of its predictions stays low.
The input's score is the mean over its overlays of the prediction entropy (bits); an input whose score is below the
threshold is called triggered. The threshold is set so that a share ``frr`` of the held-out clean inputs is rejected:
``threshold: normal`` (default, Gao et al.) takes the ``frr`` quantile of a normal fitted to their entropies;
``empirical`` the ``frr`` quantile of the entropies themselves. The normal fit assumes a symmetric distribution; a
confident model's clean entropies pile up near 0 with a long upper tail, where the fitted quantile can fall below 0
and reject nothing. Gao et al. superimpose ``overlays`` = 100 clean images on each input (config/schema.yaml).

Superimposition (``superimpose``): ``add`` sums the two uint8 images and saturates at 255 (what Gao et al.'s
public implementation does with OpenCV's weighted add at weights 1 and 1); ``average`` takes their mean. Note: the
study's square trigger is black (value 1 of 255), which an added overlay mostly covers.
"""

from __future__ import annotations

from statistics import NormalDist
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from ..attacks.triggers import load_trigger
from ..evaluate import predict_logits
from ..runtime import derived_seed
from . import DefenseContext, DefenseResult

DEFENSE = {"name": "strip", "title": "STRIP", "level": "input"}

SUPERIMPOSE = ("add", "average")


def superimpose(x: torch.Tensor, overlay: torch.Tensor, mode: str) -> torch.Tensor:
    """uint8 (..., 32, 32, 3) images and overlays of the same shape -> float NCHW-able images in [0, 1]."""
    if mode == "add":
        return (x.to(torch.int16) + overlay.to(torch.int16)).clamp_(max=255).float() / 255.0
    if mode == "average":
        return (x.float() + overlay.float()) / 510.0
    raise ValueError(f"strip.superimpose must be one of {SUPERIMPOSE}, got {mode!r}")


def strip_entropy(model: nn.Module, x: torch.Tensor, pool: torch.Tensor, overlays: int, seed: int,
                  mode: str = "add", batch_size: int = 500, device: torch.device | None = None) -> torch.Tensor:
    """Per input of ``x`` (uint8 N x 32 x 32 x 3): the mean prediction entropy over ``overlays`` superimposed
    images drawn (with replacement, seeded) from ``pool``."""
    if len(pool) == 0 or overlays < 1:
        raise ValueError("STRIP needs a non-empty pool of clean overlay images and at least one overlay")
    device = device or next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    per_chunk = max(1, batch_size // overlays)
    out = []
    for start in range(0, len(x), per_chunk):
        xb = x[start:start + per_chunk]
        idx = torch.randint(len(pool), (len(xb), overlays), generator=gen)
        mixed = superimpose(xb[:, None], pool[idx], mode).flatten(0, 1).permute(0, 3, 1, 2)
        p = torch.softmax(predict_logits(model, mixed, device, batch_size), dim=1)
        h = -(p * torch.log2(p.clamp_min(1e-12))).sum(1)
        out.append(h.view(len(xb), overlays).mean(1).cpu())
    return torch.cat(out) if out else torch.zeros(0)


THRESHOLDS = ("normal", "empirical")


def strip_threshold(clean_entropy: torch.Tensor, frr: float, method: str = "normal") -> float:
    """The entropy below which an input is called triggered, from the held-out clean entropies: the ``frr``
    quantile of the normal with their mean and sample std (``normal``), or their own ``frr`` quantile (linear
    interpolation, ``empirical``)."""
    if not 0 < frr < 1:
        raise ValueError(f"strip.frr must lie in (0, 1), got {frr}")
    h = clean_entropy.double()
    if len(h) < 2:
        raise ValueError("STRIP's threshold needs at least two held-out clean inputs")
    if method == "empirical":
        return float(torch.quantile(h, frr))
    if method != "normal":
        raise ValueError(f"strip.threshold must be one of {THRESHOLDS}, got {method!r}")
    sd = float(h.std())
    return float(h.mean()) if sd == 0 else NormalDist(float(h.mean()), sd).inv_cdf(frr)


def strip_rates(threshold: float, clean: torch.Tensor, triggered: torch.Tensor) -> dict[str, float]:
    """FRR: clean inputs rejected (entropy below the threshold); FAR: triggered inputs accepted; detection = 1 - FAR."""
    frr = float((clean < threshold).double().mean()) if len(clean) else float("nan")
    far = float((triggered >= threshold).double().mean()) if len(triggered) else float("nan")
    return {"frr": frr, "far": far, "detection": 1.0 - far}


def strip_defense(model: nn.Module, holdout: torch.Tensor, clean_test: torch.Tensor,
                  triggered: dict[str, torch.Tensor], overlays: int, frr: float, flag_rate: float, seed: int,
                  mode: str = "add", batch_size: int = 500, device: torch.device | None = None,
                  threshold_method: str = "normal") -> dict[str, Any]:
    """STRIP on one model: threshold from ``holdout`` (also the overlay pool), FRR on ``clean_test``, FAR and
    detection per trigger's triggered inputs; the model is flagged when some trigger's detection rate exceeds
    ``flag_rate``."""
    ent = lambda x, k: strip_entropy(model, x, holdout, overlays, seed + k, mode, batch_size, device)  # noqa: E731
    h_hold, h_clean = ent(holdout, 0), ent(clean_test, 1)
    threshold = strip_threshold(h_hold, frr, threshold_method)
    per_trigger = {}
    for k, (name, x) in enumerate(sorted(triggered.items()), start=2):
        h_trig = ent(x, k)
        per_trigger[name] = {**strip_rates(threshold, h_clean, h_trig), "entropy_mean": float(h_trig.mean())}
    detection = max((r["detection"] for r in per_trigger.values()), default=0.0)
    return {"threshold": threshold, "holdout_entropy_mean": float(h_hold.mean()),
            "holdout_entropy_std": float(h_hold.std()), "clean_entropy_mean": float(h_clean.mean()),
            "frr": strip_rates(threshold, h_clean, h_clean[:0])["frr"], "triggers": per_trigger,
            "detection": detection, "flagged": bool(detection > flag_rate)}


def run(ctx: DefenseContext) -> DefenseResult:
    """STRIP on the model as deployed. The test set is split by a seeded shuffle: the first ``holdout`` images are
    the defender's held-out clean set (overlay pool and threshold), the next ``test_images`` measure the FRR, and
    the non-target ones among them, with each of the run's triggers, the FAR."""
    cfg, job = ctx.config, ctx.job
    held, tested = int(cfg["holdout"]), int(cfg["test_images"])
    if held + tested > len(job.y_test):
        raise ValueError(f"strip.holdout + strip.test_images = {held + tested} exceeds the {len(job.y_test)} test "
                         "images of the dataset")
    if not ctx.triggers:
        raise ValueError("strip: no trigger file to make triggered inputs with")
    order = torch.from_numpy(np.random.default_rng(derived_seed(ctx.run.seed, "strip-split")).permutation(
        len(job.y_test)))
    holdout, test_idx = job.x_test[order[:held]], order[held:held + tested]
    clean_test = job.x_test[test_idx]
    non_target = clean_test[job.y_test[test_idx] != ctx.target]
    triggered = {name: load_trigger(path).apply(non_target) for name, path in ctx.triggers.items()}
    result = strip_defense(ctx.model, holdout, clean_test, triggered, int(cfg["overlays"]), float(cfg["frr"]),
                           float(cfg["flag_rate"]), derived_seed(ctx.run.seed, "strip"), cfg["superimpose"],
                           int(cfg["batch_size"]), job.device, cfg["threshold"])
    print({k: result[k] for k in ("threshold", "frr", "detection", "flagged")})
    return DefenseResult(result["flagged"], details={"holdout": held, "test_images": tested, **result})
