"""Evaluation: benign accuracy (BA) on the full clean test set, attack success rate (ASR) on every
non-target test image with the trigger, and per-class accuracy."""

from __future__ import annotations

import itertools
import os
import weakref
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .models.inference import fold_batchnorms
from .runtime import autocast, compiled_or_eager, resolve_device, to_input

# Largest activation (bytes) of one forward pass on a CPU. Eval outputs do not depend on the batch, but large CPU
# batches are slow: glibc serves an allocation above its mmap threshold (at most 32 MiB on 64-bit Linux) with fresh
# pages from the kernel every time, and at batch 1000 the pmoe's widest maps are hundreds of MB, so 35-65 % of the
# time went to page faults (benchmarks/README.md, "Inference on a CPU"). Below the threshold the heap reuses them.
CPU_ACTIVATION_BYTES = 30 * 2**20
# Images per CPU forward pass; None derives it from CPU_ACTIVATION_BYTES (benchmarks set it to compare).
CPU_FORWARD_BATCH: int | None = None
# torch.compile of the inference forward (inductor with the weights frozen into the graph: on a CPU its convolutions
# run on prepacked oneDNN weights and BN-ReLU is fused), the default of predict_logits' ``compile``. It costs a
# compilation per model and batch shape (seconds to tens of seconds), so it pays only where one model runs many
# forward passes (STRIP, Neural Cleanse's evaluations, deployment at several precisions); benchmarks/README.md,
# "Compiled inference". Speed only (the same predictions up to float rounding), so it is an environment variable
# (PMOE_COMPILE_INFERENCE=1 before snakemake; jobs inherit it) rather than a config key that would rerun jobs.
COMPILE_INFERENCE: bool = os.environ.get("PMOE_COMPILE_INFERENCE", "0") == "1"
# model -> (what the compiled forward was built from, the compiled forward); weak, so models are not kept alive
_COMPILED: "weakref.WeakKeyDictionary[nn.Module, tuple[tuple, Callable]]" = weakref.WeakKeyDictionary()


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


def _compiled_forward(model: nn.Module, batch_size: int, precision: str, channels_last: bool,
                      device: torch.device) -> Callable:
    """The compiled forward of ``model``'s BN-folded copy, rebuilt only when its weights (their storage or their
    in-place version counters) or the batch, precision, layout or device change."""
    import torch._inductor.config as inductor_config

    inductor_config.freezing = True  # applies to graphs compiled without gradients only
    state = tuple((t.data_ptr(), t._version) for t in itertools.chain(model.parameters(), model.buffers()))
    key = (state, batch_size, precision, channels_last, str(device))
    hit = _COMPILED.get(model)
    if hit is not None and hit[0] == key:
        return hit[1]
    fast = fold_batchnorms(model)
    forward = compiled_or_eager(fast, True, None, "the inference forward", dynamic=False)
    _COMPILED[model] = (key, forward)
    return forward


def predict_logits(model: nn.Module, x: torch.Tensor, device: torch.device | None = None, batch_size: int = 1000,
                   precision: str = "fp32", channels_last: bool = True, compile: bool | None = None) -> torch.Tensor:
    """Float32 logits for a uint8 (N, 32, 32, 3) tensor, or for float images already in the model's (N, 3, 32, 32)
    form, in inference mode.

    ``batch_size`` images per forward pass (on a CPU at most :func:`cpu_forward_batch`). The forward runs on the
    inference form of the model (:func:`~pmoe_backdoor.models.inference.fold_batchnorms`: foldable BatchNorms folded
    into their convolutions, experts at their routed positions only; the same logits up to float rounding);
    ``model`` is left as it was, its train/eval mode included. ``compile`` (default :data:`COMPILE_INFERENCE`) runs
    that copy through torch.compile, padding the last batch to the same shape; the compiled forward is kept for the
    next call on the same, unchanged model.
    """
    device = device or next(model.parameters()).device
    compile = COMPILE_INFERENCE if compile is None else compile
    was_training = model.training
    model.eval()
    if device.type == "cpu" and x.shape[0] > 1:
        batch_size = min(batch_size, cpu_forward_batch(model, channels_last))
    compile = compile and x.shape[0] >= batch_size  # one batch shape, and one worth compiling for
    if compile:
        fast, grad_mode = _compiled_forward(model, batch_size, precision, channels_last, device), torch.no_grad
    else:
        fast, grad_mode = fold_batchnorms(model), torch.inference_mode
    out = []
    with grad_mode(), autocast(device, precision):
        for start in range(0, x.shape[0], batch_size):
            xb = x[start:start + batch_size].to(device, non_blocking=True)
            n = xb.shape[0]
            if compile and n < batch_size:  # pad to the compiled shape; the padding's logits are dropped
                xb = torch.cat([xb, xb[-1:].expand(batch_size - n, *xb.shape[1:])])
            if xb.is_floating_point():
                xb = xb.contiguous(memory_format=torch.channels_last) if channels_last else xb.contiguous()
            else:
                xb = to_input(xb, channels_last)
            out.append(fast(xb)[:n].float())
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
