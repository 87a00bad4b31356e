"""Models as deployed: post-training quantization, simulated in float ("fake quantization").

Schemes (named so results can be compared with a real deployment):

- ``int8`` (W8A8): every Conv2d / Linear weight per-output-channel symmetric int8 (scale = max|w| / 127, values
  in [-127, 127]); the input of every Conv2d / Linear per-tensor affine uint8 with min/max calibrated on a
  calibration set, as PyTorch's x86/fbgemm post-training static quantization. Biases stay at full precision (an
  int32 bias in integer kernels), BatchNorm and the router's softmax / top-k run in float, as between the
  dequantize and quantize steps of a quantized model. :mod:`.int8_backend` runs the same quantized
  model on real int8 kernels.
- ``int8_dynamic``: what PyTorch's dynamic quantization (``torch.ao.quantization.quantize_dynamic`` with its
  default qconfig) does to this CNN: it quantizes ``nn.Linear`` layers only, i.e. the head's final Linear; every
  convolution (routers and experts included) stays fp32. That Linear's weight is per-tensor symmetric int8
  (PyTorch's MinMaxObserver: scale = max|w| / 127.5, values in [-128, 127]); its input is quantized at run time
  per batch, per-tensor affine over the batch's own min/max with 7-bit levels [0, 127] (the x86/fbgemm kernel's
  ``reduce_range``). Simulated rather than run on ``quantize_dynamic``'s module because that module has no
  gradient (Neural Cleanse needs one) and ``torch.ao.quantization`` is deprecated; the tests check the simulation
  against the real module.
- ``int4`` (W4, weight-only): every Conv2d / Linear weight per-output-channel symmetric int4 (scale = max|w| / 7,
  values in [-7, 7]); activations in float.

The simulation reproduces the quantization grid exactly; it differs from integer kernels only in how the
accumulator is rounded back, which is below the quantization step.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

from ..runtime import to_input

DEPLOY_PRECISIONS = ("fp32", "int8", "int4", "int8_dynamic")
# unsigned activation levels of the static int8 scheme and of PyTorch's dynamic x86/fbgemm Linear (reduce_range:
# 7 bits, so that the u8 x s8 products of its AVX2 kernels cannot saturate their int16 pair sums)
STATIC_ACT_QMAX, DYNAMIC_ACT_QMAX = 255, 127


def weight_levels(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel symmetric quantization of a weight (dim 0 = output channels): the integer levels (as
    float, in [-(2^(bits-1) - 1), 2^(bits-1) - 1]) and the scales, shaped to broadcast against ``w``."""
    qmax = 2 ** (bits - 1) - 1
    scale = w.detach().abs().flatten(1).amax(dim=1).clamp_min(1e-12) / qmax
    scale = scale.view(-1, *([1] * (w.dim() - 1)))
    return (w / scale).round().clamp(-qmax, qmax), scale


def quantize_weight(w: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-output-channel symmetric quantize-dequantize of a weight (dim 0 = output channels)."""
    levels, scale = weight_levels(w, bits)
    return levels * scale


def quantize_weight_per_tensor(w: torch.Tensor) -> torch.Tensor:
    """Per-tensor symmetric int8 quantize-dequantize as PyTorch's default dynamic weight observer: the 256
    levels [-128, 127] span max|w| on both sides, so scale = max|w| / 127.5 (at least float32's eps)."""
    scale = (w.detach().abs().max() / 127.5).clamp_min(torch.finfo(torch.float32).eps)
    return (w / scale).round().clamp(-128, 127) * scale


def activation_qparams(lo: float, hi: float, qmax: int = STATIC_ACT_QMAX) -> tuple[float, int]:
    """Scale and zero point of per-tensor affine unsigned quantization to levels [0, qmax] over [lo, hi]; the
    range is widened to hold 0 exactly (zero padding, ReLU zeros)."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = max(hi - lo, 1e-12) / qmax
    return scale, min(max(round(-lo / scale), 0), qmax)


def fake_quantize_activation(x: torch.Tensor, scale: float, zero: int, qmax: int) -> torch.Tensor:
    """Quantize-dequantize ``x`` to levels [0, qmax], with a straight-through gradient so that gradient-based
    analyses (Neural Cleanse) still run on the deployed model."""
    fq = ((x / scale).round().add(zero).clamp(0, qmax) - zero) * scale
    return x + (fq - x).detach()


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
        scale, zero = activation_qparams(self.lo, self.hi)
        return (fake_quantize_activation(x, scale, zero, STATIC_ACT_QMAX),) + tuple(args[1:])


def _dynamic_activation_quant(module, args):
    """Forward pre-hook: quantize the input over its own (whole batch) min/max, as a dynamic quantized Linear."""
    x = args[0]
    scale, zero = activation_qparams(float(x.detach().min()), float(x.detach().max()), DYNAMIC_ACT_QMAX)
    return (fake_quantize_activation(x, scale, zero, DYNAMIC_ACT_QMAX),) + tuple(args[1:])


def _quantized_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def activation_ranges(qmodel: nn.Module) -> dict[str, tuple[float, float]]:
    """The calibrated input range (min, max) of every layer of an ``int8`` model from :func:`quantize_model`,
    by module name (what a real int8 backend needs to use the same quantization parameters)."""
    ranges = {}
    for name, layer in qmodel.named_modules():
        hooks = [h for h in layer._forward_pre_hooks.values() if isinstance(h, _ActivationQuant)]
        if hooks:
            ranges[name] = (hooks[0].lo, hooks[0].hi)
    if not ranges:
        raise ValueError("activation_ranges needs a model returned by quantize_model(..., 'int8', calibration)")
    return ranges


@torch.no_grad()
def quantize_model(model: nn.Module, precision: str, calibration: torch.Tensor | None = None,
                   batch_size: int = 500) -> nn.Module:
    """A quantized copy of ``model`` (eval mode). ``int8`` needs ``calibration`` images (uint8 N x 32 x 32 x 3)."""
    if precision not in DEPLOY_PRECISIONS:
        raise ValueError(f"deployment precision must be one of {DEPLOY_PRECISIONS}, got {precision!r}")
    q = copy.deepcopy(model).eval()
    if precision == "fp32":
        return q
    if precision == "int8_dynamic":
        for layer in q.modules():
            if isinstance(layer, nn.Linear):  # quantize_dynamic's default set; Conv2d is not in it
                layer.weight.copy_(quantize_weight_per_tensor(layer.weight))
                layer.register_forward_pre_hook(_dynamic_activation_quant)
        return q
    bits = 8 if precision == "int8" else 4
    layers = _quantized_layers(q)
    for layer in layers:
        layer.weight.copy_(quantize_weight(layer.weight, bits))
    if precision == "int8":
        attach_activation_quantizers(q, layers, calibration, batch_size)
    return q


@torch.no_grad()
def attach_activation_quantizers(q: nn.Module, layers: list[nn.Module], calibration: torch.Tensor | None,
                                 batch_size: int = 500) -> None:
    """Quantize the input of each of ``layers`` (per-tensor affine uint8) with the min/max it sees on the
    ``calibration`` images (uint8 N x 32 x 32 x 3), as post-training static quantization calibrates it; ``q`` in
    eval mode."""
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


def routing_change(idx_ref: torch.Tensor, idx_other: torch.Tensor) -> float:
    """Fraction of the top-k positions (over images and experts) that differ between two routings (N, E, k)."""
    k = idx_ref.shape[-1]
    same = (idx_ref.unsqueeze(-1) == idx_other.unsqueeze(-2)).any(-1).sum(-1)  # (N, E) positions in common
    return float(1.0 - same.float().mean() / k)
