"""Fake quantisation for training: quantise-dequantise in the forward pass, identity in the backward
pass (straight-through estimator), so one set of float weights can be trained to behave differently once quantised.

Two variants, both applied to every ``Conv2d`` and ``Linear`` of the model (trunk, pre-MoE conv, the router's
1x1 score conv, the experts' grouped conv, the head's linear layer); biases, every BatchNorm, the router's softmax
and top-k and the gating products stay in float:

- ``faithful`` (Tian et al.'s recipe): each weight tensor symmetric *per tensor* (PyTorch's observer convention:
  at 8 bits scale = max|w| / 127.5, levels [-128, 127]), after folding the BatchNorm that directly follows the
  conv into it (:func:`bn_folds`: the authors quantise the fused conv-BN, as PyTorch's QAT ConvBn modules do);
  activations not fake-quantised in training (their released scripts never switch activation fake-quant on).
- ``matched`` (the deployer this project evaluates, :mod:`quantize` ``int8``): weights int8 symmetric *per output
  channel* (folding a BN changes nothing there: a per-channel scale cancels); the input of every Conv2d / Linear
  per-tensor affine uint8. The deployer calibrates that range once on clean training images; during training the
  range is the current batch's min/max (holding 0), the on-line equivalent of that calibration.

How the float and the compressed passes meet the BatchNorms is the attack's choice (``AttackConfig.bn_statistics``):
``shared`` (the authors') runs them as one batch through :func:`streams`, so each BN normalises the float and the
compressed activations with one set of batch statistics and updates its running statistics once from the combined
batch; ``per_pass`` (an ablation) runs them separately.

:func:`deploy_authors` is the deployer of the faithful variant as the authors measure it: BN folded, per-tensor
weights at the trained bit width, every Conv2d / Linear input quantised to 8 bits with ranges calibrated on clean
training images (PyTorch's post-training static quantisation).
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..deployment.quantize import attach_activation_quantizers, quantize_weight

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


def bn_scale(bn: nn.BatchNorm2d) -> torch.Tensor:
    """The per-channel factor that folding ``bn`` multiplies its conv's weight rows by: gamma / sqrt(var + eps),
    from the running statistics (what the deployed, folded model uses); detached."""
    scale = bn.running_var.detach().add(bn.eps).rsqrt()
    return scale * bn.weight.detach() if bn.affine else scale


def fake_quant_weight(w: torch.Tensor, variant: str, bits: int = 8, fold: torch.Tensor | None = None
                      ) -> torch.Tensor:
    """``bits`` applies to ``faithful`` only (8: the authors' int8; fewer: a coarser per-tensor grid);
    ``matched`` is the int8 deployer by definition. ``fold`` (per output channel, :func:`bn_scale`): quantise the
    folded weight ``w * fold`` and divide the fold back out, so that the conv's output, normalised by its BN, is
    the folded-and-quantised conv's (PyTorch's QAT ConvBn does the same)."""
    shape = (-1,) + (1,) * (w.dim() - 1)
    folded = w if fold is None else w * fold.view(shape)
    if variant == "faithful":
        quantized = quantize_weight_per_tensor(folded, bits)
    elif variant == "matched":
        if bits != 8:
            raise ValueError(f"the matched variant is the int8 deployer; bits must be 8, got {bits}")
        quantized = quantize_weight(folded, 8)
    else:
        raise ValueError(f"fake-quantisation variant must be one of {FAKEQUANT_VARIANTS}, got {variant!r}")
    return ste(w, quantized if fold is None else quantized / fold.view(shape))


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


def bn_folds(model: nn.Module) -> list[tuple[str, str]]:
    """(conv name, BN name) of every BatchNorm whose input is exactly one conv's output, so that it can be folded
    into that conv. Each architecture names its pairs in a ``BN_FOLDS`` attribute of the module that holds them
    ((conv path, BN path) relative to it); a ``nn.Sequential`` pairs a Conv2d with a BatchNorm2d right after it."""
    pairs = []
    for name, m in model.named_modules():
        prefix = f"{name}." if name else ""
        for conv, bn in getattr(m, "BN_FOLDS", ()):
            if isinstance(m.get_submodule(bn), nn.BatchNorm2d):
                pairs.append((prefix + conv, prefix + bn))
        if isinstance(m, nn.Sequential):
            children = list(m.named_children())
            pairs += [(prefix + a, prefix + b) for (a, ma), (b, mb) in zip(children, children[1:])
                      if isinstance(ma, nn.Conv2d) and isinstance(mb, nn.BatchNorm2d)]
    return pairs


def unfoldable_batchnorms(model: nn.Module) -> list[str]:
    """The BatchNorms :func:`bn_folds` cannot fold (their input is a sum, a gated map or an activated one): they stay
    float at deployment, as in a real quantised model."""
    folded = {bn for _, bn in bn_folds(model)}
    return [name for name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d) and name not in folded]


def compressed_weights(model: nn.Module, variant: str, bits: int = 8, fold_bn: bool = True) -> dict[str, torch.Tensor]:
    """Fake-quantised weights of every Conv2d / Linear by parameter name (for ``functional_call`` or a stream)."""
    folds = dict(bn_folds(model)) if fold_bn else {}
    return {f"{name}.weight": fake_quant_weight(m.weight, variant, bits,
                                                bn_scale(model.get_submodule(folds[name])) if name in folds else None)
            for name, m in quantized_layers(model)}


@contextlib.contextmanager
def input_fake_quant(model: nn.Module) -> Iterator[None]:
    """Within the block, every Conv2d / Linear input is fake-quantised to uint8 (:func:`fake_quant_activation`)."""
    def hook(module, args):
        return (fake_quant_activation(args[0]),) + tuple(args[1:])

    handles = [m.register_forward_pre_hook(hook) for _, m in quantized_layers(model)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@dataclass
class Stream:
    """One compressed copy of the model inside :func:`streams`: replacement parameters by name (``<layer>.weight``
    or ``<layer>.bias`` of a Conv2d / Linear; the others keep the model's) and whether every Conv2d / Linear input
    is fake-quantised to uint8 (the matched variant)."""

    params: dict[str, torch.Tensor] = field(default_factory=dict)
    quantize_inputs: bool = False


def _layer_forward(layer: nn.Module, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    """``layer(x)`` with ``weight`` and ``bias`` in place of its own (a conv's own padding rule kept)."""
    if isinstance(layer, nn.Linear):
        return F.linear(x, weight, bias)
    pad = getattr(layer, "pad_input", None)
    return layer._conv_forward(pad(x) if pad else x, weight, bias)


@contextlib.contextmanager
def streams(model: nn.Module, compressed: Sequence[Stream]) -> Iterator[None]:
    """Within the block, ``model(x)`` reads its batch as 1 + len(compressed) equal chunks: the first runs the
    model's own weights, chunk i + 1 the weights of ``compressed[i]``. Only the Conv2d / Linear layers tell the
    chunks apart; every other module, BatchNorm included, sees the whole batch: one set of batch statistics over
    [float ; compressed ...] and one update of the running statistics (the authors' shared BN). The model's
    parameters are not changed and gradients reach them through every chunk."""
    names = {k.rsplit(".", 1)[0] for s in compressed for k in s.params}
    any_inputs = any(s.quantize_inputs for s in compressed)
    layers = [(name, m) for name, m in quantized_layers(model) if any_inputs or name in names]
    chunks = 1 + len(compressed)

    def patched(name: str, layer: nn.Module):
        def forward(x: torch.Tensor) -> torch.Tensor:
            if x.shape[0] % chunks:
                raise ValueError(f"streams: a batch of {x.shape[0]} does not split into {chunks} equal chunks")
            parts = x.split(x.shape[0] // chunks)
            outs = [_layer_forward(layer, parts[0], layer.weight, layer.bias)]
            for s, part in zip(compressed, parts[1:]):
                part = fake_quant_activation(part) if s.quantize_inputs else part
                outs.append(_layer_forward(layer, part, s.params.get(f"{name}.weight", layer.weight),
                                           s.params.get(f"{name}.bias", layer.bias)))
            return torch.cat(outs)
        return forward

    for name, layer in layers:
        layer.forward = patched(name, layer)
    try:
        yield
    finally:
        for _, layer in layers:
            del layer.forward  # the instance attribute; the class's forward is back


@contextlib.contextmanager
def frozen_bn_statistics(model: nn.Module):
    """BatchNorms still normalise with the batch's statistics but do not update their running ones (momentum 0):
    the compressed passes must not leak into the statistics of the released model, which the victim's compressed
    model inherits unchanged (BN stays float, it is not re-estimated)."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in bns]
    for m in bns:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, momentum in zip(bns, saved):
            m.momentum = momentum


def float_and_compressed_logits(model: nn.Module, xb: torch.Tensor, compressed: Sequence[Stream],
                                bn_statistics: str) -> list[torch.Tensor]:
    """The float model's logits on ``xb`` and each compressed copy's: one pass over [xb ; xb ; ...] through
    :func:`streams` (``shared`` BN statistics), or one pass each with only the float pass updating the
    running statistics (``per_pass``)."""
    if bn_statistics == "shared":
        with streams(model, compressed):
            return list(model(torch.cat([xb] * (1 + len(compressed)))).float().split(xb.shape[0]))
    logits = [model(xb).float()]
    with frozen_bn_statistics(model):
        for s in compressed:
            ctx = input_fake_quant(model) if s.quantize_inputs else contextlib.nullcontext()
            with ctx:
                logits.append(torch.func.functional_call(model, s.params, (xb,), strict=False).float())
    return logits


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


@torch.no_grad()
def fold_bn_copy(model: nn.Module) -> nn.Module:
    """An eval-mode copy with every BN of :func:`bn_folds` folded into its conv (weight rows x gamma / sqrt(var +
    eps), bias (b - mean) x that + beta) and replaced by an identity."""
    q = copy.deepcopy(model).eval()
    for conv_name, bn_name in bn_folds(q):
        conv, bn = q.get_submodule(conv_name), q.get_submodule(bn_name)
        scale = bn_scale(bn)
        shift = (bn.bias if bn.affine else 0) - bn.running_mean * scale
        bias = conv.bias if conv.bias is not None else torch.zeros_like(scale)
        conv.weight = nn.Parameter(conv.weight * scale.view(-1, *([1] * (conv.weight.dim() - 1))))
        conv.bias = nn.Parameter(bias * scale + shift)
        _replace(q, bn_name, nn.Identity())
    return q


@torch.no_grad()
def deploy_authors(model: nn.Module, bits: int = 8, calibration: torch.Tensor | None = None,
                   fold_bn: bool = True) -> nn.Module:
    """The faithful victim's model: an eval-mode copy, BN folded (``fold_bn``), every Conv2d / Linear weight
    symmetric per tensor at ``bits``, and, given ``calibration`` images (uint8 N x 32 x 32 x 3), every Conv2d /
    Linear input per-tensor affine uint8 with its range calibrated on them (without: float activations)."""
    q = fold_bn_copy(model) if fold_bn else copy.deepcopy(model).eval()
    for _, m in quantized_layers(q):
        m.weight.copy_(quantize_weight_per_tensor(m.weight, bits))
    if calibration is not None:
        attach_activation_quantizers(q, [m for _, m in quantized_layers(q)], calibration)
    return q
