"""Model files: weights as safetensors plus the model spec in the metadata, so a file rebuilds its model
without pickle (model files are untrusted by definition)."""

from __future__ import annotations

import os
from typing import Any

import torch

from .io import load_tensors, save_tensors
from .models import build_model


def model_from_spec(spec: dict[str, Any], num_classes: int) -> torch.nn.Module:
    spec = dict(spec)
    arch = spec.pop("arch")
    return build_model(arch, num_classes, **spec)


def save_model(model: torch.nn.Module, spec: dict[str, Any], num_classes: int, path: str | os.PathLike,
               extra: dict[str, Any] | None = None) -> None:
    save_tensors(path, dict(model.state_dict()), {"model": spec, "num_classes": num_classes, **(extra or {})})


def load_model(path: str | os.PathLike, device: torch.device | str = "cpu") -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild a model from a safetensors file written by :func:`save_model`."""
    state, meta = load_tensors(path)
    if "model" not in meta or "num_classes" not in meta:
        raise ValueError(f"{path}: not a pmoe-backdoor model file (metadata lacks 'model' / 'num_classes')")
    model = model_from_spec(meta["model"], meta["num_classes"])
    model.load_state_dict(state)
    return model.to(device), meta
