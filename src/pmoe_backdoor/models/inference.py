"""The inference form of a model: the same function up to float rounding, fewer passes over the widest maps.

:func:`fold_batchnorms` makes it (the copy :func:`pmoe_backdoor.evaluate.predict_logits` runs); the training form
stays in :mod:`pmoe_backdoor.models.architectures`.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from .architectures import PatchMoE, PMoENet, PreActBlock


class SparseExpertPool(nn.Module):
    """Inference form of a :class:`~.architectures.PatchMoE` followed by its head's ReLU and 8x8 mean: the
    same values, with the experts run at their k routed positions only.

    At a position an expert did not pick, its input is the zero vector, so (BN in eval mode) its output is one
    constant vector per expert, ``expert_conv(relu(expert_bn(0)))``; it is computed once and counted H*W - k
    times. That is a quarter of the experts' work at k = 16 of 64 (the 1x1 convs of the paper's model: 3.4 % of
    the forward's FLOPs) and no gated (B, E*C, 8, 8) map, the forward's widest with the 32x32 ones. Returns the pooled
    (B, E*Ce, 1, 1) map, already ReLU'd (the head's ReLU and mean leave it as it is; its BN must be folded into
    ``expert_conv`` first), and the routing indices.
    """

    def __init__(self, moe: PatchMoE):
        super().__init__()
        self.moe = moe

    def forward(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        moe = self.moe
        b, c, h, w = feats.shape
        top_vals, top_idx = moe.routing_probs(feats).topk(moe.top_k, dim=-1)  # (B, E, k)
        rows = feats.permute(0, 2, 3, 1).reshape(b, h * w, c)  # a view for channels_last maps
        # slot j of expert e holds its j-th pick: (B, k, E, C) in memory is the channels_last (B, E*C, k, 1) map
        # that the grouped BN and 1x1 conv read per expert, as they read the dense (B, E*C, 8, 8) map
        picked = rows[torch.arange(b, device=feats.device).view(b, 1, 1), top_idx.transpose(1, 2)]
        gated = picked * top_vals.transpose(1, 2).unsqueeze(3).to(picked.dtype)
        gated = gated.reshape(b, moe.top_k, 1, moe.num_experts * c).permute(0, 3, 1, 2)
        routed = F.relu(moe.expert_conv(F.relu(moe.expert_bn(gated)))).sum(dim=(2, 3))  # (B, E*Ce)
        unpicked = F.relu(moe.expert_conv(F.relu(moe.expert_bn(gated.new_zeros(1, moe.num_experts * c, 1, 1)))))
        pooled = (routed + (h * w - moe.top_k) * unpicked.flatten(1)) / (h * w)
        return pooled.view(b, -1, 1, 1), top_idx


def _fold_bn_into_conv(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    """conv <- BN(conv) in eval mode: per output channel, W*s and (b - mean)*s + beta, s = gamma/sqrt(var + eps).
    New tensors are assigned (the old ones may be shared with another model)."""
    with torch.no_grad():
        scale = bn.running_var.add(bn.eps).rsqrt()
        shift = -bn.running_mean * scale
        if bn.affine:
            scale, shift = scale * bn.weight, shift * bn.weight + bn.bias
        bias = conv.bias if conv.bias is not None else torch.zeros_like(scale)
        conv.weight = nn.Parameter(conv.weight * scale.view(-1, *([1] * (conv.weight.dim() - 1))))
        conv.bias = nn.Parameter(bias * scale + shift)


def fold_batchnorms(model: nn.Module) -> nn.Module:
    """An eval-mode copy of ``model`` for inference, each BatchNorm whose input is only a convolution's output
    folded into that convolution: every block's ``bn2`` (after ``conv1``) and the pMoE head's BN (after the
    experts' conv), and the pMoE's experts run at their routed positions only (:class:`SparseExpertPool`). The
    same function up to float rounding, one pass over the widest maps fewer per block.

    The other BNs cannot be folded exactly: ``bn1`` and ``pre_bn`` read a residual sum that the shortcut also reads
    and feed a zero-padded conv, and the experts' BN reads the gated map. The copy shares the unchanged tensors
    with ``model``, which is not changed; a model with nothing to fold is returned as it is (not copied), as is
    one with hooks (they may rely on the layers).
    """
    foldable = any(isinstance(m, (PreActBlock, PMoENet)) for m in model.modules())
    hooked = any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    if not foldable or hooked or any(m.running_var is None for m in bns):
        return model
    shared = {id(t): t for t in (*model.parameters(), *model.buffers())}
    folded = copy.deepcopy(model, memo=shared).eval()
    for m in list(folded.modules()):
        if isinstance(m, PreActBlock) and isinstance(m.bn2, nn.BatchNorm2d):
            _fold_bn_into_conv(m.conv1, m.bn2)
            m.bn2 = nn.Identity()
        if isinstance(m, PMoENet) and isinstance(m.head.bn, nn.BatchNorm2d):
            _fold_bn_into_conv(m.moe.expert_conv, m.head.bn)
            m.head.bn = nn.Identity()
            m.moe = SparseExpertPool(m.moe)
    return folded
