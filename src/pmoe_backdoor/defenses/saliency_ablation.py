"""Saliency-guided patch ablation: :mod:`.router_ablation`'s test with the patches ranked by Grad-CAM (Selvaraju et
al.), the localisation SentiNet (Chou et al.) uses, so it applies to every model.

Grad-CAM of the predicted class on the last convolutional map: the map the classifier head pools (the pMoE's
experts' output, already 8x8; PreAct-ResNet-18's last block, 4x4; the WRN's last group, 8x8) or, where that map is
1x1 (VGG pools its last 2x2 map away), the last convolution's output before it. The map is brought to the 8x8 grid of
4x4 patches (bilinear when coarser, average pooling when finer) so that both defenses rank the same 64 positions.
The ranking pass is the forward that predicts the label plus one backward; then 1 + ``top_m`` occlusions
(:mod:`.patch_ablation`).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..models.routing import GRID
from . import DefenseContext, DefenseResult
from .patch_ablation import run_patch_ablation

DEFENSE = {"name": "saliency_ablation", "title": "Saliency ablation", "level": "input"}


def to_grid(cam: torch.Tensor) -> torch.Tensor:
    """A (B, 1, h, w) map -> (B, 64) on the 8x8 grid: bilinear up to it, average pooling down to it."""
    h, w = cam.shape[-2:]
    if h >= GRID and w >= GRID:
        cam = F.adaptive_avg_pool2d(cam, GRID)
    else:
        cam = F.interpolate(cam, size=(GRID, GRID), mode="bilinear", align_corners=False)
    return cam.flatten(1)


def gradcam_ranker(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits and the Grad-CAM map of the predicted class on the 8x8 grid, (B, 64), from one forward and one
    backward pass."""
    maps: dict[str, torch.Tensor] = {}

    def head_input(module, args):
        maps["head"] = args[0]

    def conv_output(module, args, out):
        maps["conv"] = out  # the last convolution to run overwrites the others

    hooks = [model.head.register_forward_pre_hook(head_input)]
    hooks += [m.register_forward_hook(conv_output) for m in model.modules() if isinstance(m, nn.Conv2d)]
    try:
        with torch.enable_grad():
            # an input that needs a gradient: the graph exists even when the parameters are frozen
            logits = model(x.detach().clone().requires_grad_(True))
            fmap = maps["head"] if maps["head"].dim() == 4 and maps["head"][0, 0].numel() > 1 else maps["conv"]
            chosen = logits.gather(1, logits.argmax(dim=1, keepdim=True)).sum()
            (grad,) = torch.autograd.grad(chosen, fmap)
    finally:
        for h in hooks:
            h.remove()
    weights = grad.mean(dim=(2, 3), keepdim=True)  # per channel: the map's importance for the class
    cam = F.relu((weights * fmap.detach()).sum(dim=1, keepdim=True))
    return logits.detach(), to_grid(cam)


def run(ctx: DefenseContext) -> DefenseResult:
    return run_patch_ablation(ctx, "saliency_ablation", gradcam_ranker, {"ranking": "gradcam"})
