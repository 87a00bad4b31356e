"""The opening every job shares: the dataset as tensors, the device, model files and the triggered test set."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from ..attacks.poison import asr_set
from ..attacks.triggers import load_trigger
from ..data.datasets import Dataset, load_npz
from ..models.checkpoint import load_model
from ..runtime import derived_seed, resolve_device


@dataclass(frozen=True)
class RunId:
    """Which trained model a result belongs to; written into every per-run result so tables can group them."""

    dataset: str
    model: str
    attack: str
    seed: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class JobData:
    """A job's dataset (canonical uint8 NHWC arrays as tensors) and the device it computes on."""

    dataset: Dataset
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    device: torch.device

    @classmethod
    def open(cls, data_path: str, device: str = "auto") -> "JobData":
        ds = load_npz(data_path)
        tensors = {k: torch.from_numpy(getattr(ds, k)) for k in ("x_train", "y_train", "x_test", "y_test")}
        return cls(ds, **tensors, device=resolve_device(device))

    @property
    def num_classes(self) -> int:
        return self.dataset.num_classes

    def load_model(self, weights: str) -> tuple[torch.nn.Module, dict[str, Any]]:
        return load_model(weights, self.device)

    def asr_images(self, trigger_path: str | None, target: int) -> torch.Tensor | None:
        """Every non-target test image with the trigger (the ASR set), or None for a clean run."""
        if not trigger_path:
            return None
        return asr_set(self.x_test, self.y_test, load_trigger(trigger_path), target)[0]

    def shuffled_train_images(self, count: int, seed: int, purpose: str) -> torch.Tensor:
        """``count`` clean training images after a shuffle drawn from the run seed and the purpose."""
        order = np.random.default_rng(derived_seed(seed, purpose)).permutation(len(self.y_train))
        return self.x_train[torch.from_numpy(order[:count])]
