"""The pMoE CNN of Chowdhury et al. (2023) as used by Chan et al. (2025), and a dense WRN baseline.

Faithful to the authors' Keras model (docs/faithful-behaviour.md §1): pre-activation WRN trunk, TF-style asymmetric
padding for the stride-2 3x3 convolutions, BN eps 1e-3 / momentum 0.01, Xavier-uniform weights with zero biases,
per-expert routers that pick the top-k of 64 patch positions and multiply the features by the softmax
probabilities there, experts applied to the full masked 8x8 map.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import model_kind

BN_EPS = 1e-3
BN_MOMENTUM = 0.01  # Keras momentum 0.99


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


def set_bn_momentum(model: nn.Module, momentum: float) -> None:
    """Override the running-statistics momentum of every BatchNorm (PyTorch convention: weight of the new batch).

    The faithful 0.01 (Keras 0.99) needs a few hundred steps before the running statistics forget their
    initial values; the experts' masked maps have a variance near 1e-4, far from the initial 1. On small CPU
    subsets (79 steps per epoch) a larger momentum is the documented departure.
    """
    if not 0.0 < momentum <= 1.0:
        raise ValueError(f"bn_momentum must lie in (0, 1], got {momentum}")
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = momentum


class TFSamePadConv(nn.Conv2d):
    """A stride-2 3x3 convolution with TensorFlow's 'same' padding: 0 before, 1 after on even inputs.

    PyTorch's ``padding=1`` would centre output (0, 0) on input pixel (0, 0); TF centres it on (1, 1).
    """

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int = 3, stride: int = 2, bias: bool = True):
        super().__init__(in_ch, out_ch, kernel_size, stride=stride, padding=0, bias=bias)

    def pad_input(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size, k, s in ((x.shape[-1], self.kernel_size[1], self.stride[1]),
                           (x.shape[-2], self.kernel_size[0], self.stride[0])):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        return F.pad(x, pads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(self.pad_input(x))


def _relu(x: torch.Tensor) -> torch.Tensor:
    """ReLU of a tensor the caller owns (a fresh BN output): in place when no autograd graph is recorded."""
    return F.relu(x) if torch.is_grad_enabled() else x.relu_()


def _conv3x3(in_ch: int, out_ch: int, stride: int) -> nn.Conv2d:
    if stride == 1:
        return nn.Conv2d(in_ch, out_ch, 3, padding=1)
    return TFSamePadConv(in_ch, out_ch, 3, stride)


class PreActBlock(nn.Module):
    """BN-ReLU-conv3x3(stride)-BN-ReLU-conv3x3, plus a 1x1 shortcut conv on the raw block input."""

    BN_FOLDS = (("conv1", "bn2"),)  # bn2 reads conv1's output only (attacks.fakequant.bn_folds)

    def __init__(self, in_ch: int, out_ch: int, stride: int):
        super().__init__()
        self.bn1 = _bn(in_ch)
        self.conv1 = _conv3x3(in_ch, out_ch, stride)
        self.bn2 = _bn(out_ch)
        self.conv2 = _conv3x3(out_ch, out_ch, 1)
        self.shortcut = (nn.Conv2d(in_ch, out_ch, 1, stride=stride)
                         if (in_ch != out_ch or stride != 1) else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(_relu(self.bn1(x)))
        out = self.conv2(_relu(self.bn2(out)))
        return self.shortcut(x) + out


class Trunk(nn.Module):
    """Stem (3->16) and two pre-activation WRN groups of one block each: 32x32x(16k) then 16x16x(32k)."""

    def __init__(self, widen_factor: int):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.group1 = PreActBlock(16, 16 * widen_factor, 1)
        self.group2 = PreActBlock(16 * widen_factor, 32 * widen_factor, 2)
        self.out_channels = 32 * widen_factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.group2(self.group1(self.stem(x)))


class PatchMoE(nn.Module):
    """Per-expert top-k patch routing over the 8x8 grid, experts BN-ReLU-1x1 conv, concatenated.

    All experts run at once: their masked maps are stacked along channels (expert e owns channels
    e*C..(e+1)*C), one BatchNorm over E*C channels equals E separate BNs, and a grouped 1x1 conv equals E
    separate 640->160 convs. Output channels are in expert order, as the authors' concatenation.
    """

    # gate a channels_last map in its own layout; off where layouts cannot be queried (vmapped packed training)
    layout_aware_gating = True

    def __init__(self, in_channels: int, expert_channels: int, num_experts: int, top_k: int):
        super().__init__()
        self.num_experts, self.top_k = num_experts, top_k
        self.in_channels, self.expert_channels = in_channels, expert_channels
        # one 1x1 score kernel per expert, no bias; stored together as an (E, C, 1, 1) conv weight
        self.router = nn.Conv2d(in_channels, num_experts, 1, bias=False)
        self.expert_bn = _bn(num_experts * in_channels)
        self.expert_conv = nn.Conv2d(num_experts * in_channels, num_experts * expert_channels, 1, groups=num_experts)

    def routing_probs(self, feats: torch.Tensor) -> torch.Tensor:
        """Each expert's softmax over the H*W positions (B, E, H*W), positions row-major: p = 8r + c."""
        # in fp32 so bf16 rounding cannot create top-k ties
        return self.router(feats).flatten(2).float().softmax(dim=-1)

    def route(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the gating mask (B, E, H*W) holding softmax values at the top-k positions, and the indices."""
        probs = self.routing_probs(feats)
        top_vals, top_idx = probs.topk(self.top_k, dim=-1)
        mask = torch.zeros_like(probs).scatter(-1, top_idx, top_vals)
        return mask.to(feats.dtype), top_idx

    def forward(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, c, h, w = feats.shape
        e = self.num_experts
        mask, top_idx = self.route(feats)
        if self.layout_aware_gating and feats.is_contiguous(memory_format=torch.channels_last) \
                and not feats.is_contiguous():
            # F is (B, H, W, C) in memory; gated into (B, H, W, E, C), it *is* the channels_last (B, E*C, H, W) map:
            # no layout copies and unit-stride products, forward and backward (the broadcast product below needs
            # copies of the gated map: 8 % of a profiled widen-10 CPU training step; benchmarks/README.md)
            gate = mask.view(b, e, h, w).permute(0, 2, 3, 1).contiguous().unsqueeze(4)  # (B, H, W, E, 1)
            masked = (feats.permute(0, 2, 3, 1).unsqueeze(3) * gate).reshape(b, h, w, e * c).permute(0, 3, 1, 2)
        else:
            masked = feats.unsqueeze(1) * mask.view(b, e, 1, h, w)  # (B, E, C, H, W)
            masked = masked.reshape(b, e * c, h, w)
        return self.expert_conv(_relu(self.expert_bn(masked))), top_idx

    def expert_slice(self, expert: int) -> slice:
        """The output channels (and expert_conv weight rows) that belong to ``expert``."""
        return slice(expert * self.expert_channels, (expert + 1) * self.expert_channels)


class Head(nn.Module):
    """BN-ReLU-global mean-Linear (the authors' 8x8 average pool over the whole map)."""

    def __init__(self, channels: int, num_classes: int):
        super().__init__()
        self.bn = _bn(channels)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.relu(self.bn(x)).mean(dim=(2, 3)))


class PMoENet(nn.Module):
    BN_FOLDS = (("moe.expert_conv", "head.bn"),)  # the head's BN reads the experts' conv only

    def __init__(self, num_classes: int, widen_factor: int = 10, num_experts: int = 4, top_k: int = 16,
                 moe_channels: int | None = None, expert_channels: int | None = None):
        super().__init__()
        self.trunk = Trunk(widen_factor)
        moe_channels = moe_channels or 64 * widen_factor
        expert_channels = expert_channels or 16 * widen_factor
        # BN-ReLU-conv3x3/2 to the shared 8x8 feature map F that every router and expert sees
        self.pre_bn = _bn(self.trunk.out_channels)
        self.pre_conv = TFSamePadConv(self.trunk.out_channels, moe_channels, 3, 2)
        self.moe = PatchMoE(moe_channels, expert_channels, num_experts, top_k)
        self.head = Head(num_experts * expert_channels, num_classes)
        init_weights(self)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The shared pre-MoE map F (B, moe_channels, 8, 8)."""
        return self.pre_conv(_relu(self.pre_bn(self.trunk(x))))

    def forward(self, x: torch.Tensor, return_routing: bool = False):
        expert_out, top_idx = self.moe(self.features(x))
        logits = self.head(expert_out)
        return (logits, top_idx) if return_routing else logits


class WideResNet(nn.Module):
    """The dense baseline: the same trunk with an ordinary third WRN group (stride 2) instead of the MoE stage."""

    def __init__(self, num_classes: int, widen_factor: int = 10):
        super().__init__()
        self.trunk = Trunk(widen_factor)
        self.group3 = PreActBlock(self.trunk.out_channels, 64 * widen_factor, 2)
        self.head = Head(64 * widen_factor, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor, return_routing: bool = False):
        logits = self.head(self.group3(self.trunk(x)))
        return (logits, None) if return_routing else logits


def _xavier_uniform_(weight: torch.Tensor, groups: int = 1) -> None:
    # Keras Glorot-uniform: fan_in = in_per_group * kh * kw, fan_out = out_per_group * kh * kw
    receptive = weight[0, 0].numel() if weight.dim() > 2 else 1
    fan_in = weight.shape[1] * receptive
    fan_out = weight.shape[0] // groups * receptive
    bound = math.sqrt(6.0 / (fan_in + fan_out))
    with torch.no_grad():
        weight.uniform_(-bound, bound)


def init_weights(model: nn.Module) -> None:
    """Keras defaults: Glorot-uniform kernels, zero biases; BN gamma 1, beta 0; routers Normal(0, 1e-4)."""
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            _xavier_uniform_(m.weight, getattr(m, "groups", 1))
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    for m in model.modules():
        if isinstance(m, PatchMoE):
            nn.init.normal_(m.router.weight, mean=0.0, std=1e-4)


def build_model(name: str, num_classes: int, bn_momentum: float = BN_MOMENTUM, **config: Any) -> nn.Module:
    """Build a registered architecture (``pmoe_backdoor.models.MODELS``) from its config keys.
    ``bn_momentum``: see :func:`set_bn_momentum`."""
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2, got {num_classes}")
    model = model_kind(name).load()(num_classes, **config)
    set_bn_momentum(model, bn_momentum)
    return model


def _check_width(widen_factor: int) -> None:
    if widen_factor < 1:
        raise ValueError(f"widen_factor must be a positive integer, got {widen_factor}")


def build_wrn(num_classes: int, widen_factor: int = 10, **ignored: Any) -> nn.Module:
    """The dense WRN baseline (the pMoE's routing keys, when given, do not apply)."""
    _check_width(widen_factor)
    return WideResNet(num_classes, widen_factor)


def build_pmoe(num_classes: int, widen_factor: int = 10, num_experts: int = 4, top_k: int = 16,
               moe_width: str = "scaled") -> nn.Module:
    """The faithful pMoE. ``moe_width``: ``"scaled"`` (default) gives the pre-MoE map 64*k channels and each
    expert 16*k, which at the paper's widen factor 10 are the authors' 640 and 160; ``"fixed"`` pins them to 640
    and 160 at any width, as the authors' literal constants do."""
    _check_width(widen_factor)
    if not 1 <= top_k <= 64:
        raise ValueError(f"top_k must lie in [1, 64] (the 8x8 patch grid), got {top_k}")
    if num_experts < 1:
        raise ValueError(f"num_experts must be positive, got {num_experts}")
    if moe_width not in ("scaled", "fixed"):
        raise ValueError(f"moe_width must be 'scaled' or 'fixed', got {moe_width!r}")
    fixed = moe_width == "fixed"
    return PMoENet(num_classes, widen_factor, num_experts, top_k,
                   moe_channels=640 if fixed else None, expert_channels=160 if fixed else None)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
