"""Data augmentation on uint8 (N, 32, 32, 3) batches, seeded: the standard CIFAR crop and flip."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def random_crop_flip(x: torch.Tensor, gen: torch.Generator, padding: int = 4) -> torch.Tensor:
    """Each image zero-padded by ``padding`` pixels on every side, cropped back to its size at a uniformly drawn
    offset, and mirrored left-right with probability 1/2 (torchvision's RandomCrop(32, padding=4) and
    RandomHorizontalFlip, as the source papers train). The draws come from ``gen`` (a CPU generator); ``x`` is not
    modified."""
    n, h, w, _ = x.shape
    padded = F.pad(x, (0, 0, padding, padding, padding, padding))
    dy = torch.randint(0, 2 * padding + 1, (n, 1), generator=gen)
    dx = torch.randint(0, 2 * padding + 1, (n, 1), generator=gen)
    flip = torch.rand(n, 1, generator=gen) < 0.5
    rows = dy + torch.arange(h)
    cols = dx + torch.arange(w)
    cols = torch.where(flip, cols.flip(1), cols)
    index = torch.arange(n).view(n, 1, 1)
    return padded[index.to(x.device), rows.view(n, h, 1).to(x.device), cols.view(n, 1, w).to(x.device)]
