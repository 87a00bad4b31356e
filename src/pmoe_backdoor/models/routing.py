"""Routing (patch-selection) analysis, docs/faithful-behaviour.md §7.

Position p of the 8x8 grid is (row, col) = (p // 8, p % 8). For analysis the authors treat it as the pixel
block rows 4r..4r+3, cols 4c..4c+3 (its true receptive field is 17x17 px centred on (4r+3, 4c+3)); this
module follows their convention.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

from ..attacks.triggers import Trigger
from ..runtime import to_input

GRID = 8
BLOCK = 4


@torch.inference_mode()
def routing_indices(model: nn.Module, x: torch.Tensor, batch_size: int = 1000,
                    device: torch.device | None = None) -> torch.Tensor:
    """Top-k positions per expert, (N, E, k) int64 on the CPU, in eval mode."""
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, x.shape[0], batch_size):
        _, idx = model(to_input(x[start:start + batch_size].to(device)), return_routing=True)
        if idx is None:
            raise TypeError(f"{type(model).__name__} has no routing (only pmoe models route patches)")
        out.append(idx.cpu())
    model.train(was_training)
    return torch.cat(out)


def patch_grid(idx: torch.Tensor | np.ndarray) -> np.ndarray:
    """(E, k) selected positions -> (E, 8, 8) maps with 1 at the routed positions."""
    idx = np.asarray(idx)
    grid = np.zeros((idx.shape[0], GRID * GRID), dtype=np.int64)
    np.put_along_axis(grid, idx, 1, axis=1)
    return grid.reshape(-1, GRID, GRID)


def patch_sums(image: torch.Tensor | np.ndarray) -> np.ndarray:
    """(8, 8) sums over each 4x4x3 block of the [0, 1]-scaled image (0 to 48), as the authors' Fig. 5."""
    img = np.asarray(image, dtype=np.float64) / 255.0
    return img.reshape(GRID, BLOCK, GRID, BLOCK, 3).sum(axis=(1, 3, 4))


def trigger_positions(trigger: Trigger) -> list[int]:
    """The grid positions whose 4x4 block overlaps a trigger that writes a fixed box of pixels (``patch_located``:
    the square)."""
    if not trigger.spec.patch_located:
        raise TypeError(f"trigger positions are defined for patch-located triggers, not {trigger.kind!r}")
    row, col, height, width = trigger.pixel_box()
    rows = range(row // BLOCK, (row + height - 1) // BLOCK + 1)
    cols = range(col // BLOCK, (col + width - 1) // BLOCK + 1)
    return [r * GRID + c for r in rows for c in cols]


def trigger_patch_stats(idx: torch.Tensor, positions: list[int]) -> dict[str, object]:
    """For routing ``idx`` (N, E, k): the fraction of images whose trigger patch reaches at least one expert,
    the mean number of experts that receive it, and per expert the fraction of images where it does."""
    hit = torch.isin(idx, torch.tensor(positions)).any(dim=-1)  # (N, E)
    per_image = hit.sum(dim=1).float()
    return {
        "n_images": int(idx.shape[0]),
        "reached_fraction": float((per_image > 0).float().mean()),
        "mean_experts": float(per_image.mean()),
        "per_expert_fraction": hit.float().mean(dim=0).tolist(),
    }
