"""Evaluation: benign accuracy (BA) on the full clean test set, attack success rate (ASR) on every
non-target test image with the trigger, and per-class accuracy."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from .runtime import autocast, resolve_device, to_input


def predict_logits(model: nn.Module, x: torch.Tensor, device: torch.device | None = None, batch_size: int = 1000,
                   precision: str = "fp32", channels_last: bool = True) -> torch.Tensor:
    """Float32 logits for a uint8 (N, 32, 32, 3) tensor, in inference mode with large batches."""
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    with torch.inference_mode(), autocast(device, precision):
        for start in range(0, x.shape[0], batch_size):
            xb = to_input(x[start:start + batch_size].to(device, non_blocking=True), channels_last)
            out.append(model(xb).float())
    model.train(was_training)
    return torch.cat(out) if out else torch.empty(0)


def evaluate(model: nn.Module, x_test: torch.Tensor, y_test: torch.Tensor, x_asr: torch.Tensor | None = None,
             target: int = 0, num_classes: int | None = None, batch_size: int = 1000, precision: str = "fp32",
             device: torch.device | None = None) -> dict[str, Any]:
    """BA (%), clean test loss and per-class accuracy (%); ASR (%) if the triggered set ``x_asr`` is given."""
    device = device or resolve_device()
    model = model.to(device)
    logits = predict_logits(model, x_test, device, batch_size, precision)
    y = y_test.to(logits.device)
    pred = logits.argmax(1)
    num_classes = num_classes or int(y.max()) + 1
    correct = (pred == y).float()
    per_class = torch.full((num_classes,), float("nan"))
    counts = torch.bincount(y, minlength=num_classes)
    hits = torch.bincount(y, weights=correct, minlength=num_classes)
    present = counts > 0
    per_class[present] = (100.0 * hits[present] / counts[present]).cpu().float()
    result: dict[str, Any] = {
        "ba": 100.0 * correct.mean().item(),
        "test_loss": F.cross_entropy(logits, y).item(),
        "per_class_acc": [None if torch.isnan(v) else round(v.item(), 4) for v in per_class],
        "n_test": int(len(y)),
    }
    if x_asr is not None:
        asr_pred = predict_logits(model, x_asr, device, batch_size, precision).argmax(1)
        result["asr"] = 100.0 * (asr_pred == target).float().mean().item() if len(asr_pred) else float("nan")
        result["n_asr"] = int(len(asr_pred))
    return result
