"""Evaluation: benign accuracy (BA) on the full clean test set, attack success rate (ASR) on every
non-target test image with the trigger, and per-class accuracy."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from .models import fold_batchnorms
from .runtime import autocast, resolve_device, to_input

# Largest activation (bytes) of one forward pass on a CPU. Eval outputs do not depend on the batch, but large CPU
# batches are slow: glibc serves an allocation above its mmap threshold (at most 32 MiB on 64-bit Linux) with fresh
# pages from the kernel every time, and at batch 1000 the pmoe's widest maps are hundreds of MB, so 35-65 % of the
# time went to page faults (benchmarks/README.md, "Inference on a CPU"). Below the threshold the heap reuses them.
CPU_ACTIVATION_BYTES = 30 * 2**20
# Images per CPU forward pass; None derives it from CPU_ACTIVATION_BYTES (benchmarks set it to compare).
CPU_FORWARD_BATCH: int | None = None


def widest_activation_bytes(model: nn.Module, channels_last: bool = True) -> int:
    """Bytes of the largest module output of one image's eval forward (float32), found by running one image."""
    widest = [0]

    def record(_module, _args, output):
        for t in output if isinstance(output, tuple) else (output,):
            if isinstance(t, torch.Tensor):
                widest[0] = max(widest[0], t.numel() * 4)

    device = next(model.parameters()).device
    hooks = [m.register_forward_hook(record) for m in model.modules() if not list(m.children())]
    try:
        with torch.inference_mode():
            model(to_input(torch.zeros(1, 32, 32, 3, dtype=torch.uint8, device=device), channels_last))
    finally:
        for h in hooks:
            h.remove()
    return widest[0]


def cpu_forward_batch(model: nn.Module, channels_last: bool = True) -> int:
    """Images per CPU forward pass: as many as keep the widest activation within :data:`CPU_ACTIVATION_BYTES`."""
    if CPU_FORWARD_BATCH is not None:
        return CPU_FORWARD_BATCH
    return max(1, CPU_ACTIVATION_BYTES // max(1, widest_activation_bytes(model, channels_last)))


def predict_logits(model: nn.Module, x: torch.Tensor, device: torch.device | None = None, batch_size: int = 1000,
                   precision: str = "fp32", channels_last: bool = True) -> torch.Tensor:
    """Float32 logits for a uint8 (N, 32, 32, 3) tensor, in inference mode.

    ``batch_size`` images per forward pass (on a CPU at most :func:`cpu_forward_batch`). The forward runs on a
    copy with the foldable BatchNorms folded into their convolutions (:func:`~pmoe_backdoor.models.fold_batchnorms`;
    the same logits up to float rounding); ``model`` is left as it was, its train/eval mode included.
    """
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    if device.type == "cpu" and x.shape[0] > 1:
        batch_size = min(batch_size, cpu_forward_batch(model, channels_last))
    fast = fold_batchnorms(model)
    out = []
    with torch.inference_mode(), autocast(device, precision):
        for start in range(0, x.shape[0], batch_size):
            xb = to_input(x[start:start + batch_size].to(device, non_blocking=True), channels_last)
            out.append(fast(xb).float())
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
