"""Occluding the patches of the pMoE's 8x8 grid of 4x4-pixel patches (position p: pixel rows 4r..4r+3, columns
4c..4c+3 with (r, c) = (p // 8, p % 8), as in :mod:`pmoe_backdoor.models.routing`), and what an occluded patch is
filled with: shared by the patch-ablation defenses (:mod:`.patch_ablation`) and their :mod:`.localisation_maps`."""

from __future__ import annotations

import torch

from ..models.routing import BLOCK, GRID
from ..runtime import to_input

POSITIONS = GRID * GRID
FILLS = ("clean_patch", "mean")


def position_masks(dilate: int = 0) -> torch.Tensor:
    """(64, 32, 32) bool: the pixels of each grid position's 4x4 patch, with ``dilate`` > 0 also those of the
    patches up to ``dilate`` grid steps away (rows and columns: a (2 dilate + 1)^2 block, cut at the border)."""
    grid = torch.eye(POSITIONS, dtype=torch.bool).view(POSITIONS, 1, GRID, GRID).float()
    if dilate:
        grid = torch.nn.functional.max_pool2d(grid, 2 * dilate + 1, stride=1, padding=dilate)
    grid = grid.bool().view(POSITIONS, GRID, GRID)
    return grid.repeat_interleave(BLOCK, dim=1).repeat_interleave(BLOCK, dim=2)


def occlusion_masks(top: torch.Tensor, dilate: int = 0) -> torch.Tensor:
    """Suspect positions (B, m) -> (B, m + 1, 32, 32) bool: each position alone, then all m together (each with
    its neighbourhood when ``dilate`` > 0: a trigger the routers avoid sits next to the patches they pick)."""
    single = position_masks(dilate).to(top.device)[top]  # (B, m, 32, 32)
    return torch.cat([single, single.any(dim=1, keepdim=True)], dim=1)


def occlude(x: torch.Tensor, masks: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
    """Float images (B, 3, 32, 32), masks (B, V, 32, 32) and fill images broadcastable to (B, 3, 32, 32) ->
    (B, V, 3, 32, 32): the images with the masked pixels taken from the fill, every other pixel unchanged."""
    fill = fill.expand_as(x)
    return torch.where(masks[:, :, None], fill[:, None], x[:, None])


def occluded_probs(model: torch.nn.Module, x: torch.Tensor, masks: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
    """The model's class probabilities (B, V, classes), fp32, for each of the V occlusions ``masks`` (B, V, 32, 32)
    of each float image of ``x`` (B, 3, 32, 32), filled from ``fill`` (see :func:`occlude`); one forward pass."""
    variants = occlude(x, masks, fill).flatten(0, 1)
    p = model(variants.contiguous(memory_format=torch.channels_last)).float().softmax(dim=1)
    return p.view(masks.shape[0], masks.shape[1], -1)


def fill_images(fill: str, pool: torch.Tensor, count: int, gen: torch.Generator, exclude_self: bool = False
                ) -> torch.Tensor:
    """What an occluded patch of each of ``count`` inputs is filled with, as float images (count or 1, 3, 32, 32):
    a clean image drawn from ``pool`` (uint8 N x 32 x 32 x 3) per input, or the pool's mean colour. With
    ``exclude_self`` the inputs are the pool itself and input i never draws pool image i."""
    if fill == "mean":
        return to_input(pool, channels_last=False).mean(dim=(0, 2, 3)).view(1, 3, 1, 1)
    if fill != "clean_patch":
        raise ValueError(f"fill must be one of {FILLS}, got {fill!r}")
    if exclude_self:
        if len(pool) < 2:
            raise ValueError("clean_patch fill of the held-out inputs needs at least two held-out images")
        # an offset of 1..N-1 from the input's own index: any other image, uniformly
        idx = (torch.arange(count) + 1 + torch.randint(len(pool) - 1, (count,), generator=gen)) % len(pool)
    else:
        idx = torch.randint(len(pool), (count,), generator=gen)
    return to_input(pool[idx], channels_last=False)
