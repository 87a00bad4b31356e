"""Models as deployed: post-training quantization, simulated in float ("fake quantization").

Schemes (named so results can be compared with a real deployment):

- ``int8`` (W8A8): every Conv2d / Linear weight per-output-channel symmetric int8 (scale = max|w| / 127, values
  in [-127, 127]); the input of every Conv2d / Linear per-tensor affine uint8 with min/max calibrated on a
  calibration set, as PyTorch's x86/fbgemm post-training static quantization. Biases stay at full precision (an
  int32 bias in integer kernels), BatchNorm and the router's softmax / top-k run in float, as between the
  dequantize and quantize steps of a quantized model.
- ``int4`` (W4, weight-only): every Conv2d / Linear weight per-output-channel symmetric int4 (scale = max|w| / 7,
  values in [-7, 7]); activations in float.

The simulation reproduces the quantization grid exactly; it differs from integer kernels only in how the
accumulator is rounded back, which is below the quantization step.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

from .runtime import to_input

DEPLOY_PRECISIONS = ("fp32", "int8", "int4")


def quantize_weight(w: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-output-channel symmetric quantize-dequantize of a weight (dim 0 = output channels)."""
    qmax = 2 ** (bits - 1) - 1
    scale = w.detach().abs().flatten(1).amax(dim=1).clamp_min(1e-12) / qmax
    scale = scale.view(-1, *([1] * (w.dim() - 1)))
    return (w / scale).round().clamp(-qmax, qmax) * scale


class _ActivationQuant:
    """Forward pre-hook on a layer: observes its input's min/max, then fake-quantizes it (uint8, per tensor)."""

    def __init__(self):
        self.lo, self.hi, self.calibrating = float("inf"), float("-inf"), True

    def __call__(self, module, args):
        x = args[0]
        if self.calibrating:
            self.lo = min(self.lo, float(x.min()))
            self.hi = max(self.hi, float(x.max()))
            return None
        lo, hi = min(self.lo, 0.0), max(self.hi, 0.0)  # the range must hold 0 exactly (zero padding)
        scale = max(hi - lo, 1e-12) / 255.0
        zero = round(-lo / scale)
        q = (x / scale).round().add(zero).clamp(0, 255)
        fq = (q - zero) * scale
        # straight-through gradient, so gradient-based analyses (Neural Cleanse) still run on the deployed model
        return (x + (fq - x).detach(),) + tuple(args[1:])


def _quantized_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


@torch.no_grad()
def quantize_model(model: nn.Module, precision: str, calibration: torch.Tensor | None = None,
                   batch_size: int = 500) -> nn.Module:
    """A quantized copy of ``model`` (eval mode). ``int8`` needs ``calibration`` images (uint8 N x 32 x 32 x 3)."""
    if precision not in DEPLOY_PRECISIONS:
        raise ValueError(f"deployment precision must be one of {DEPLOY_PRECISIONS}, got {precision!r}")
    q = copy.deepcopy(model).eval()
    if precision == "fp32":
        return q
    bits = 8 if precision == "int8" else 4
    layers = _quantized_layers(q)
    for layer in layers:
        layer.weight.copy_(quantize_weight(layer.weight, bits))
    if precision == "int8":
        if calibration is None or len(calibration) == 0:
            raise ValueError("int8 quantization needs calibration images for the activation ranges")
        hooks = [_ActivationQuant() for _ in layers]
        for layer, hook in zip(layers, hooks):
            layer.register_forward_pre_hook(hook)
        device = next(q.parameters()).device
        for start in range(0, len(calibration), batch_size):
            q(to_input(calibration[start:start + batch_size].to(device)))
        for hook in hooks:
            hook.calibrating = False
    return q


def routing_change(idx_ref: torch.Tensor, idx_other: torch.Tensor) -> float:
    """Fraction of the top-k positions (over images and experts) that differ between two routings (N, E, k)."""
    k = idx_ref.shape[-1]
    same = (idx_ref.unsqueeze(-1) == idx_other.unsqueeze(-2)).any(-1).sum(-1)  # (N, E) positions in common
    return float(1.0 - same.float().mean() / k)
