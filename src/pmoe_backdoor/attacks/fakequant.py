"""Fake quantisation for training: quantise-dequantise in the forward pass, identity in the backward
pass (straight-through estimator), so one set of float weights can be trained to behave differently once quantised.

Two variants, both applied to every ``Conv2d`` and ``Linear`` of the model (trunk, pre-MoE conv, the router's
1x1 score conv, the experts' grouped conv, the head's linear layer); biases, every BatchNorm, the router's softmax
and top-k and the gating products always stay in float (BN cannot be folded: it comes before its conv):

- ``faithful`` (Tian et al.'s recipe): each weight tensor int8 symmetric *per tensor* from the current weights
  (PyTorch's observer convention: scale = max|w| / 127.5, levels [-128, 127]); activations not quantised (their
  released scripts never switch activation fake-quant on).
- ``matched`` (the deployer this project evaluates, :mod:`quantize` ``int8``): weights int8 symmetric *per output
  channel*; the input of every Conv2d / Linear per-tensor affine uint8. The deployer calibrates that range once on
  clean training images; during training the range is the current batch's min/max (holding 0), the on-line
  equivalent of that calibration.

``deploy_faithful`` is the deployer of the faithful variant (per-tensor int8 weights, float activations), so the
released model can be measured as the faithful victim would run it.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Iterator

import torch
import torch.nn as nn
from torch.func import functional_call

from ..deployment.quantize import quantize_weight

FAKEQUANT_VARIANTS = ("faithful", "matched")


def quantize_weight_per_tensor(w: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """Symmetric per-tensor quantise-dequantise with PyTorch's symmetric min/max observer convention generalised to
    ``bits``: the 2^bits levels [-2^(bits-1), 2^(bits-1) - 1] span max|w| on both sides, one scale
    max|w| / ((2^bits - 1) / 2) for the whole tensor. At 8 bits it is :func:`quantize.quantize_weight_per_tensor`
    (the deployer's own, checked by the tests)."""
    half = (2 ** bits - 1) / 2
    scale = (w.detach().abs().amax() / half).clamp_min(torch.finfo(torch.float32).eps)
    return (w / scale).round().clamp(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) * scale


def ste(x: torch.Tensor, quantized: torch.Tensor) -> torch.Tensor:
    """``quantized`` in the forward pass, gradient passed to ``x`` unchanged (straight-through estimator)."""
    return x + (quantized - x).detach()


def fake_quant_weight(w: torch.Tensor, variant: str, bits: int = 8) -> torch.Tensor:
    """``bits`` applies to ``faithful`` only (8: the authors' int8; fewer: a coarser per-tensor grid, which the
    tests use to show the mechanism in a few dozen steps); ``matched`` is the int8 deployer by definition."""
    if variant == "faithful":
        return ste(w, quantize_weight_per_tensor(w, bits))
    if variant == "matched":
        if bits != 8:
            raise ValueError(f"the matched variant is the int8 deployer; bits must be 8, got {bits}")
        return ste(w, quantize_weight(w, 8))
    raise ValueError(f"fake-quantisation variant must be one of {FAKEQUANT_VARIANTS}, got {variant!r}")


def fake_quant_activation(x: torch.Tensor) -> torch.Tensor:
    """Per-tensor affine uint8 quantise-dequantise of ``x`` with the range of ``x`` itself (holding 0, as the
    deployer's), straight-through gradient."""
    lo = x.detach().amin().clamp(max=0.0)
    hi = x.detach().amax().clamp(min=0.0)
    scale = (hi - lo).clamp_min(1e-12) / 255.0
    zero = (-lo / scale).round()
    q = (x.detach() / scale).round().add(zero).clamp(0, 255)
    return ste(x, (q - zero) * scale)


def quantized_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


@contextlib.contextmanager
def _activation_hooks(model: nn.Module) -> Iterator[None]:
    def hook(module, args):
        return (fake_quant_activation(args[0]),) + tuple(args[1:])

    handles = [m.register_forward_pre_hook(hook) for _, m in quantized_layers(model)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def fake_quant_forward(model: nn.Module, x: torch.Tensor, variant: str, bits: int = 8, **kwargs):
    """The model's forward with fake-quantised weights (and, ``matched``, activations); gradients reach the float
    weights through the straight-through estimator. The model's own parameters are not changed."""
    weights = {f"{name}.weight": fake_quant_weight(m.weight, variant, bits) for name, m in quantized_layers(model)}
    ctx = _activation_hooks(model) if variant == "matched" else contextlib.nullcontext()
    with ctx:
        return functional_call(model, weights, (x,), kwargs, strict=False)


@torch.no_grad()
def deploy_faithful(model: nn.Module, bits: int = 8) -> nn.Module:
    """An eval-mode copy with every Conv2d / Linear weight symmetric per tensor (int8 by default); activations in
    float."""
    q = copy.deepcopy(model).eval()
    for _, m in quantized_layers(q):
        m.weight.copy_(quantize_weight_per_tensor(m.weight, bits))
    return q
