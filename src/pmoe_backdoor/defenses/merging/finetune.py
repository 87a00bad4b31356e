"""Victims for module switching: copies of one clean ancestor fine-tuned on (differently) poisoned data."""

from __future__ import annotations

import copy
from typing import Any, Mapping, TextIO

import torch
import torch.nn as nn

from ...training.loop import TrainConfig, fit

# the fine-tuning recipe unless the config says otherwise (the rest are TrainConfig's defaults)
FINETUNE_DEFAULTS: dict[str, Any] = {"lr": 0.01, "epochs": 5, "batch_size": 128}


def finetune_config(train_cfg: Mapping[str, Any] | None = None) -> TrainConfig:
    return TrainConfig.from_dict({**FINETUNE_DEFAULTS, **dict(train_cfg or {})})


def finetune_copy(ancestor: nn.Module, x_train: torch.Tensor, y_train: torch.Tensor,
                  train_cfg: Mapping[str, Any] | None = None, x_test: torch.Tensor | None = None,
                  y_test: torch.Tensor | None = None, device: torch.device | None = None,
                  log: TextIO | None | str = "stderr") -> tuple[nn.Module, dict[str, Any]]:
    """(the fine-tuned copy, its training history); the ancestor is left untouched."""
    model = copy.deepcopy(ancestor)
    history = fit(model, x_train, y_train, finetune_config(train_cfg), x_test, y_test, device=device, log=log)
    return model, history
