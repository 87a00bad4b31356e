"""Dirty-label, source-agnostic poisoning (docs/faithful-behaviour.md §4) and the ASR test set (§5).

A poisoned training set is never copied: it is the clean set plus a record of which indices were replaced
and their triggered images (:class:`PoisonRecord`), applied on the fly.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
import torch

from ..io import load_tensors, save_tensors
from .triggers import Trigger


def num_poisoned(rate_percent: float, n: int) -> int:
    """``int(rate * N)`` as the authors, computed exactly from the decimal rate (0.1 % of 50,000 is 50)."""
    if not 0 <= rate_percent <= 100:
        raise ValueError(f"poisoning rate must be a percentage in [0, 100], got {rate_percent}")
    return math.floor(Fraction(str(rate_percent)) * n / 100)


def choose_poison_indices(labels: np.ndarray, rate_percent: float, seed: int, target: int = 0,
                          exclude_target: bool = False) -> np.ndarray:
    """Draw ``int(rate * N)`` distinct training indices with a seed, from all classes by default (faithful);
    ``exclude_target`` draws only from non-target images. Returned sorted."""
    n = len(labels)
    count = num_poisoned(rate_percent, n)
    candidates = np.flatnonzero(labels != target) if exclude_target else np.arange(n)
    if count > len(candidates):
        raise ValueError(f"cannot poison {count} images: only {len(candidates)} candidates")
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(candidates, count, replace=False)).astype(np.int64)


@dataclass
class PoisonRecord:
    indices: torch.Tensor  # int64 (P,), sorted
    images: torch.Tensor   # uint8 (P, 32, 32, 3): the triggered training images at those indices
    target: int
    meta: dict

    def save(self, path: str | os.PathLike) -> None:
        save_tensors(path, {"indices": self.indices, "images": self.images}, dict(self.meta, target=self.target))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "PoisonRecord":
        tensors, meta = load_tensors(path)
        if "indices" not in tensors or "images" not in tensors or "target" not in meta:
            raise ValueError(f"{path}: not a poison record (expected tensors 'indices', 'images' and a 'target')")
        target = meta.pop("target")
        try:
            target = int(target)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{path}: not a poison record (its 'target' is {target!r}, not a class index)") from exc
        return cls(tensors["indices"], tensors["images"], target, meta)

    def apply(self, x: torch.Tensor, y: torch.Tensor, relabel: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """The poisoned training set: triggered images in place, labelled with the target if ``relabel``.

        ``relabel=False`` gives the authors' contaminated "clean" set for the square trigger (triggered
        images with their true labels), used by faithful Fine-Pruning.
        """
        x, y = x.clone(), y.clone()
        if len(self.indices):
            idx = self.indices.to(x.device)
            x[idx] = self.images.to(x.device)
            if relabel:
                y[idx] = self.target
        return x, y


def make_poison(x_train: np.ndarray | torch.Tensor, y_train: np.ndarray, trigger: Trigger, rate_percent: float,
                seed: int, target: int = 0, exclude_target: bool = False) -> PoisonRecord:
    y = np.asarray(y_train)
    idx = choose_poison_indices(y, rate_percent, seed, target, exclude_target)
    x = torch.as_tensor(x_train)
    images = trigger.apply(x[torch.from_numpy(idx)]) if len(idx) else x[:0].clone()
    meta = {"rate_percent": rate_percent, "seed": seed, "exclude_target": exclude_target,
            "trigger": trigger.kind, "n_train": int(len(y))}
    return PoisonRecord(torch.from_numpy(idx), images, target, meta)


def asr_set(x_test: torch.Tensor, y_test: torch.Tensor, trigger: Trigger, target: int = 0
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Every non-target test image with the trigger applied, with its true label."""
    keep = y_test != target
    return trigger.apply(x_test[keep]), y_test[keep]
