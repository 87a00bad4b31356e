"""Model files: weights as safetensors plus the model spec in the metadata, so a file rebuilds its model
without pickle (model files are untrusted by definition)."""

from __future__ import annotations

import os
from typing import Any

import torch

from ..io import load_tensors, save_tensors
from .architectures import build_model


def model_from_spec(spec: dict[str, Any], num_classes: int) -> torch.nn.Module:
    spec = dict(spec)
    arch = spec.pop("arch")
    return build_model(arch, num_classes, **spec)


def save_model(model: torch.nn.Module, spec: dict[str, Any], num_classes: int, path: str | os.PathLike,
               extra: dict[str, Any] | None = None) -> None:
    save_tensors(path, dict(model.state_dict()), {"model": spec, "num_classes": num_classes, **(extra or {})})


def load_model(path: str | os.PathLike, device: torch.device | str = "cpu") -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild a model from a safetensors file written by :func:`save_model`. A file that does not make one fails
    with a ValueError naming it (FileNotFoundError where it is missing), whatever is wrong with it."""
    state, meta = load_tensors(path)
    if "model" not in meta or "num_classes" not in meta:
        raise ValueError(f"{path}: not a pmoe-backdoor model file (its metadata lacks the model spec: "
                         f"'model' and 'num_classes'; it has {sorted(meta)})")
    try:
        model = model_from_spec(meta["model"], meta["num_classes"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{path}: the model spec in its metadata ({meta['model']!r}, {meta['num_classes']!r} "
                         f"classes) builds no model: {type(exc).__name__}: {exc}") from exc
    mismatch = state_mismatch(model.state_dict(), state)
    if mismatch:
        raise ValueError(f"{path}: its weights do not fit the model its metadata specifies ({meta['model']!r}): "
                         f"{mismatch}")
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:  # what state_mismatch does not look at
        raise ValueError(f"{path}: its weights do not load into the model its metadata specifies: {exc}") from exc
    return model.to(device), meta


def state_mismatch(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor], examples: int = 3) -> str:
    """What keeps ``found`` from loading where ``expected`` is, in a line ("" when it fits): torch's own message
    lists every key, hundreds of them for a file of another architecture."""
    def some(keys: list[str]) -> str:
        return ", ".join(keys[:examples]) + (", ..." if len(keys) > examples else "")

    missing = sorted(expected.keys() - found.keys())
    unexpected = sorted(found.keys() - expected.keys())
    reshaped = sorted(k for k in expected.keys() & found.keys() if expected[k].shape != found[k].shape)
    problems = [f"{len(missing)} missing ({some(missing)})" if missing else "",
                f"{len(unexpected)} unexpected ({some(unexpected)})" if unexpected else "",
                f"{len(reshaped)} of another shape ({some(reshaped)})" if reshaped else ""]
    return "; ".join(p for p in problems if p)
