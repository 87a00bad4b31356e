"""Fine-Pruning (Liu et al. 2018) as the authors applied it to the pMoE (docs/faithful-behaviour.md §6).

Faithful default: the four experts' 1x1 convs are pruned; in each expert the channels are ranked by the
signed mean of that conv's raw output (before the head's BN) over the activation images; the weights and
biases of the lowest ``int(C * rate)`` channels are zeroed once, without a mask, then the model is
fine-tuned. ``mask=True`` keeps the pruned channels at zero during fine-tuning (Liu et al.'s original).
"""

from __future__ import annotations

import torch

from ..models.architectures import PMoENet
from ..runtime import autocast, to_input


@torch.inference_mode()
def expert_channel_means(model: PMoENet, x: torch.Tensor, batch_size: int = 500, precision: str = "fp32",
                         device: torch.device | None = None) -> torch.Tensor:
    """(E, C): the signed mean over images and positions of each expert conv's raw output, eval mode."""
    if not isinstance(model, PMoENet):
        raise TypeError(f"Fine-Pruning of the expert layers needs a pmoe model, got {type(model).__name__}")
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    total = torch.zeros(model.moe.num_experts * model.moe.expert_channels, dtype=torch.float64, device=device)
    for start in range(0, x.shape[0], batch_size):
        with autocast(device, precision):
            out, _ = model.moe(model.features(to_input(x[start:start + batch_size].to(device))))
        total += out.float().sum(dim=(0, 2, 3)).double()
    model.train(was_training)
    count = x.shape[0] * 64
    return (total / count).float().view(model.moe.num_experts, model.moe.expert_channels).cpu()


def channels_to_prune(means: torch.Tensor, rate_percent: float) -> list[torch.Tensor]:
    """Per expert, the ``int(C * rate)`` channels with the lowest mean (ascending order)."""
    n = int(means.shape[1] * rate_percent / 100.0 + 1e-9)
    return [torch.argsort(row, stable=True)[:n] for row in means]


def prune_experts(model: PMoENet, pruned: list[torch.Tensor], mask: bool = False) -> None:
    """Zero the chosen output channels' weights and biases in each expert conv (in place).

    With ``mask`` the zeros are enforced by torch.nn.utils.prune, so fine-tuning cannot regrow them;
    call :func:`remove_masks` before saving.
    """
    conv = model.moe.expert_conv
    rows = torch.cat([idx + e * model.moe.expert_channels for e, idx in enumerate(pruned)]).to(conv.weight.device)
    if not mask:
        with torch.no_grad():
            conv.weight[rows] = 0
            conv.bias[rows] = 0
        return
    from torch.nn.utils import prune

    keep_w = torch.ones_like(conv.weight)
    keep_w[rows] = 0
    keep_b = torch.ones_like(conv.bias)
    keep_b[rows] = 0
    prune.custom_from_mask(conv, "weight", keep_w)
    prune.custom_from_mask(conv, "bias", keep_b)


def remove_masks(model: PMoENet) -> None:
    from torch.nn.utils import prune

    for name in ("weight", "bias"):
        if prune.is_pruned(model.moe.expert_conv) and hasattr(model.moe.expert_conv, f"{name}_mask"):
            prune.remove(model.moe.expert_conv, name)
