"""Localisation maps of the patch-ablation defenses, for a few triggered inputs: where the trigger really is, where
the defense's ranking looks, and where occluding a patch actually lowers the prediction.

Three 8x8 maps per input, on the pMoE's grid of 4x4-pixel patches (:mod:`.patch_ablation`):

- ``footprint``: the trigger's true footprint, the mean absolute pixel change (0-255) the trigger makes in each
  patch (a square's box, a blend's or warp's spread over the image);
- ``ranking``: the defense's own score per position (the routers' probabilities, or Grad-CAM);
- ``occlusion``: the drop of the predicted class's probability when that patch alone is filled (64 occlusions per
  input, the same fill as the defense), the ground truth of what the ranking tries to find.

They are the defense job's artifacts (its ``.safetensors`` beside the summary) and the localisation figure's input;
they cost 1 + 64 forward passes per mapped input, beside the defense's 6 per tested input.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..models.routing import BLOCK, GRID
from ..runtime import to_input
from .occlusion import POSITIONS, fill_images, occluded_probs, position_masks


def patch_means(change: torch.Tensor) -> torch.Tensor:
    """(N, 32, 32) per-pixel values -> (N, 8, 8): their mean over each 4x4 patch."""
    return change.view(-1, GRID, BLOCK, GRID, BLOCK).mean(dim=(2, 4))


@torch.no_grad()
def localisation_maps(model: nn.Module, ranker, clean: torch.Tensor, triggered: torch.Tensor, fill: torch.Tensor,
                      device: torch.device | None = None) -> dict[str, torch.Tensor]:
    """The maps of each of a few triggered inputs (uint8 (N, 32, 32, 3), made from ``clean``, the same images without
    the trigger; their 64 N occlusions go through one forward pass); ``fill`` as the defense fills (float, (N or 1,
    3, 32, 32)). Returns the triggered ``images`` and
    the ``footprint``, ``ranking`` and ``occlusion`` maps (N, 8, 8), float32."""
    if clean.shape != triggered.shape:
        raise ValueError(f"clean {tuple(clean.shape)} and triggered {tuple(triggered.shape)} images must match")
    device = device or next(model.parameters()).device
    footprint = patch_means((triggered.float() - clean.float()).abs().mean(dim=-1))
    was_training = model.training
    model.eval()
    try:
        x = to_input(triggered.to(device), channels_last=False)
        logits, scores = ranker(model, x)
        with torch.inference_mode():
            p0 = logits.float().softmax(dim=1)
            label = p0.argmax(dim=1)
            masks = position_masks().to(device).expand(len(x), POSITIONS, -1, -1)
            p = occluded_probs(model, x, masks, fill.to(device))  # (N, 64, classes): a few inputs, one pass
            kept = p.gather(2, label.view(-1, 1, 1).expand(-1, POSITIONS, 1)).squeeze(2)
            drops = p0.gather(1, label[:, None]) - kept
    finally:
        model.train(was_training)
    return {"images": triggered.cpu(), "footprint": footprint.float(),
            "ranking": scores.float().view(-1, GRID, GRID).cpu(), "occlusion": drops.view(-1, GRID, GRID).cpu()}


def first_maps(model: nn.Module, ranker, clean: torch.Tensor, triggered: torch.Tensor, pool: torch.Tensor,
               fill: str, count: int, seed: int, device: torch.device | None = None) -> dict[str, torch.Tensor]:
    """:func:`localisation_maps` of the first ``count`` triggered inputs, their fill drawn from ``pool`` as the
    defense draws it (its own seeded generator, so the maps leave the defense's draws unchanged)."""
    n = min(count, len(triggered))
    fills = fill_images(fill, pool, n, torch.Generator().manual_seed(seed))
    return localisation_maps(model, ranker, clean[:n], triggered[:n], fills, device)
