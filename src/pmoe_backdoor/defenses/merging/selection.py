"""Selection after merging: the suspect (backdoor target) class and the candidate to deploy (MSD).

Suspect class: for each model (the victims and the WAG model) and each class c, an input is optimised from
seeded noise until the model predicts c (Adam, lr 0.1, at most 200 steps; x = sigmoid(z), NCHW in [0, 1] as
``runtime.to_input`` gives). With ``early_stop`` (default) an input is frozen at the first step the model
predicts c for it, which is the literal "until"; an input that never gets there keeps its last value and is
reported in ``reached``. Its feature is the input of the model's final linear layer (read by a forward hook).
S(c) = sum over models of the mean over the clean images not of class c of 1 - cos(feature_c, clean feature),
clean features taken by the same model in eval mode; c* = argmax S (ties to the lowest class).

Candidate: the one whose clean non-c* features are least aligned with WAG's c* feature (the largest mean
1 - cos); ties to the first candidate.

Measured on widen-1 pMoEs trained on synthetic data (tests/test_merging.py): with a blend trigger
the inversion reaches the target through the trigger and c* is the target; with a square patch it never draws
the patch, and the target (whose features dirty-label poisoning mixes with every class) tends to score lowest.

The clean set is held out from the test set: ``per_class`` images of each class, drawn with a seed; the rest is
what results are reported on.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass, fields
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ...runtime import to_input


@dataclass
class InversionConfig:
    steps: int = 200
    lr: float = 0.1
    seed: int = 0
    early_stop: bool = True
    batch_size: int = 500  # clean-feature batches

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> "InversionConfig":
        unknown = set(d or {}) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"inversion config: unknown key(s) {sorted(unknown)}")
        cfg = cls(**dict(d or {}))
        if cfg.steps < 1 or cfg.lr <= 0 or cfg.batch_size < 1:
            raise ValueError(f"inversion config: steps and batch_size must be positive and lr > 0, got {cfg}")
        return cfg


def holdout_split(y_test: np.ndarray | torch.Tensor, per_class: int = 50, seed: int = 0
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(held-out clean indices, the rest), both sorted: ``per_class`` test images of every class, seeded."""
    y = np.asarray(y_test)
    rng = np.random.default_rng(seed)
    chosen = []
    for c in np.unique(y):
        members = np.flatnonzero(y == c)
        if len(members) < per_class:
            raise ValueError(f"class {c} has {len(members)} test images, fewer than the {per_class} to hold out")
        chosen.append(rng.choice(members, per_class, replace=False))
    held = np.sort(np.concatenate(chosen)).astype(np.int64) if chosen else np.zeros(0, np.int64)
    rest = np.setdiff1d(np.arange(len(y)), held).astype(np.int64)
    return held, rest


def final_linear(model: nn.Module) -> nn.Linear:
    head = getattr(model, "head", None)
    if head is not None and isinstance(getattr(head, "fc", None), nn.Linear):
        return head.fc
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no linear layer to read features from")
    return linears[-1]


@contextlib.contextmanager
def capture_features(model: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Collect the input of the final linear layer of every forward pass while the block runs."""
    seen: list[torch.Tensor] = []
    handle = final_linear(model).register_forward_hook(lambda mod, inp, out: seen.append(inp[0]))
    try:
        yield seen
    finally:
        handle.remove()


@contextlib.contextmanager
def _eval(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@torch.no_grad()
def clean_features(model: nn.Module, x: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """(n, d) float32 features of uint8 (n, 32, 32, 3) images, eval mode, on the model's device."""
    device = next(model.parameters()).device
    out = []
    with _eval(model), capture_features(model) as seen:
        for start in range(0, x.shape[0], batch_size):
            model(to_input(x[start:start + batch_size].to(device)))
            out.append(seen.pop().float())
    return torch.cat(out)


def invert_classes(model: nn.Module, num_classes: int, cfg: InversionConfig | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(features (C, d), reached (C,) bool): one optimised input per class, see the module docstring."""
    cfg = cfg or InversionConfig()
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(cfg.seed)
    z = torch.randn(num_classes, 3, 32, 32, generator=gen).to(device).requires_grad_(True)
    target = torch.arange(num_classes, device=device)
    final = z.detach().clone()
    reached = torch.zeros(num_classes, dtype=torch.bool, device=device)
    opt = torch.optim.Adam([z], lr=cfg.lr)
    with _eval(model):
        for _ in range(cfg.steps + 1):  # the last pass only checks the last update
            logits = model(torch.sigmoid(z))
            hit = logits.argmax(1) == target
            if cfg.early_stop:
                new = hit & ~reached
                final[new] = z.detach()[new]
                reached |= new
                if bool(reached.all()):
                    break
            else:
                reached = hit
            loss = F.cross_entropy(logits.float(), target, reduction="none")
            loss = loss[~reached].sum() if cfg.early_stop else loss.sum()
            z.grad, = torch.autograd.grad(loss, z)
            opt.step()
        if not cfg.early_stop:
            final = z.detach()
        final[~reached] = z.detach()[~reached]
        with torch.no_grad(), capture_features(model) as seen:
            model(torch.sigmoid(final))
    return seen[0].float(), reached


def _mean_distance(features: torch.Tensor, clean: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the clean rows where ``mask`` of 1 - cos(feature, clean row); features (K, d), mask (K, n)."""
    dist = 1.0 - F.normalize(features, dim=1) @ F.normalize(clean, dim=1).T
    return (dist * mask).sum(1) / mask.sum(1).clamp_min(1)


def suspect_class(models: Sequence[nn.Module], x_clean: torch.Tensor, y_clean: torch.Tensor, num_classes: int,
                  cfg: InversionConfig | None = None) -> dict[str, Any]:
    """S(c) summed over ``models`` (the victims and the WAG model); ``inverted`` keeps each model's (C, d)
    features for the candidate choice."""
    cfg = cfg or InversionConfig()
    y = torch.as_tensor(y_clean).cpu()
    classes = torch.arange(num_classes)
    total = torch.zeros(num_classes, dtype=torch.float64)
    per_model, reached, inverted = [], [], []
    for model in models:
        feats, ok = invert_classes(model, num_classes, cfg)
        clean = clean_features(model, x_clean, cfg.batch_size).cpu()
        mask = (y[None, :] != classes[:, None]).float()
        score = _mean_distance(feats.cpu(), clean, mask).double()
        total += score
        per_model.append(score.tolist())
        reached.append(ok.cpu().tolist())
        inverted.append(feats.cpu())
    return {"suspect": int(torch.argmax(total)), "scores": total.tolist(), "per_model": per_model,
            "reached": reached, "inverted": inverted}


def candidate_scores(candidates: Sequence[nn.Module], wag_feature: torch.Tensor, x_clean: torch.Tensor,
                     y_clean: torch.Tensor, suspect: int, batch_size: int = 500) -> list[float]:
    """Per candidate: the mean over clean images not of class ``suspect`` of 1 - cos(WAG's c* feature, feature)."""
    keep = torch.as_tensor(y_clean).cpu() != suspect
    out = []
    for model in candidates:
        clean = clean_features(model, x_clean[keep], batch_size).cpu()
        out.append(float(_mean_distance(wag_feature.cpu()[None].float(), clean, torch.ones(1, len(clean)))[0]))
    return out


def select_candidate(victims: Sequence[nn.Module], wag: nn.Module, candidates: Mapping[str, nn.Module],
                     x_clean: torch.Tensor, y_clean: torch.Tensor, num_classes: int,
                     cfg: InversionConfig | Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The suspect class and the chosen candidate, as a JSON-able record."""
    cfg = cfg if isinstance(cfg, InversionConfig) else InversionConfig.from_dict(cfg)
    found = suspect_class([*victims, wag], x_clean, y_clean, num_classes, cfg)
    c_star = found["suspect"]
    names = list(candidates)
    scores = candidate_scores([candidates[n] for n in names], found["inverted"][-1][c_star], x_clean, y_clean,
                              c_star, cfg.batch_size)
    chosen = names[int(np.argmax(scores))]
    return {"suspect_class": c_star, "class_scores": found["scores"], "class_scores_per_model": found["per_model"],
            "models": [f"victim{i}" for i in range(len(victims))] + ["wag"], "reached": found["reached"],
            "candidate_scores": dict(zip(names, scores)), "chosen": chosen, "inversion": asdict(cfg)}
