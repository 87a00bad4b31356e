"""Activation Clustering (Chen et al., 2018): poisoned training samples of a label separate from the clean ones in
the network's last hidden layer.

Per label, the penultimate activations (the input of the final linear layer: the head's pooled features, 640-d at
the paper's width) of every training sample carrying that label are centred and reduced to ``dims`` (10)
dimensions by PCA (Chen et al. use ICA; PCA is deterministic and needs no extra dependency), then split by 2-means
(k-means++ seeding, ``restarts`` seeded restarts, the lowest inertia kept). A label is flagged when its smaller
cluster holds at most ``size_threshold`` of the label's samples and the split's silhouette score is at least
``silhouette_threshold`` (relative size and silhouette are the two criteria of the paper); the samples of the
flagged labels' smaller clusters are the ones called poisoned, and the model is flagged when any label is.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn as nn

from ..attacks.poison import PoisonRecord
from ..runtime import derived_seed, to_input
from . import DefenseContext, DefenseResult

DEFENSE = {"name": "activation_clustering", "title": "Activation Clustering", "level": "data"}


@torch.inference_mode()
def penultimate_features(model: nn.Module, x: torch.Tensor, batch_size: int = 500,
                         device: torch.device | None = None) -> torch.Tensor:
    """(N, D) float32: what the final linear layer ``model.head.fc`` receives for the uint8 images ``x``, as the
    model runs (a quantized model's forward hooks on that layer apply first)."""
    fc = getattr(getattr(model, "head", None), "fc", None)
    if fc is None:
        raise TypeError(f"{type(model).__name__} has no head.fc: cannot read its penultimate features")
    device = device or next(model.parameters()).device
    model.eval()
    captured: list[torch.Tensor] = []
    hook = fc.register_forward_pre_hook(lambda m, args: captured.append(args[0].detach().float().cpu()))
    try:
        for start in range(0, len(x), batch_size):
            model(to_input(x[start:start + batch_size].to(device)))
    finally:
        hook.remove()
    return torch.cat(captured)


def pca_reduce(feats: np.ndarray, dims: int) -> np.ndarray:
    """Centred data projected on its top ``dims`` principal directions (fewer if there are fewer samples)."""
    centred = feats - feats.mean(0, keepdims=True)
    _, _, vt = np.linalg.svd(centred.astype(np.float64), full_matrices=False)
    return centred @ vt[:dims].T


def two_means(points: np.ndarray, seed: int, restarts: int = 10, iters: int = 100) -> np.ndarray:
    """Labels 0/1 of a 2-means split (k-means++ start, Lloyd iterations); the best of ``restarts`` by inertia."""
    rng = np.random.default_rng(seed)
    best, best_inertia = np.zeros(len(points), dtype=np.int64), np.inf
    for _ in range(restarts):
        first = points[rng.integers(len(points))]
        d2 = ((points - first) ** 2).sum(1)
        second = points[rng.choice(len(points), p=d2 / d2.sum())] if d2.sum() > 0 else first
        centres = np.stack([first, second])
        for _ in range(iters):
            labels = ((points[:, None] - centres[None]) ** 2).sum(-1).argmin(1)
            new = np.stack([points[labels == k].mean(0) if (labels == k).any() else centres[k] for k in (0, 1)])
            if np.allclose(new, centres):
                break
            centres = new
        inertia = float(((points - centres[labels]) ** 2).sum())
        if inertia < best_inertia:
            best, best_inertia = labels, inertia
    return best


def silhouette(points: np.ndarray, labels: np.ndarray) -> float:
    """Mean silhouette (b - a) / max(a, b) of a two-cluster split (Euclidean); 0 when a cluster is empty or a
    singleton's own distance is undefined (Rousseeuw's convention s = 0 for singletons)."""
    if len(np.unique(labels)) < 2:
        return 0.0
    sq = (points ** 2).sum(1)  # |a - b|^2 = |a|^2 + |b|^2 - 2 a.b: an N x N matrix, never N x N x dims
    d = np.sqrt(np.clip(sq[:, None] + sq[None] - 2 * points @ points.T, 0, None))
    s = np.zeros(len(points))
    for k in (0, 1):
        own, other = labels == k, labels != k
        n_own = own.sum()
        if n_own < 2:
            continue
        a = d[np.ix_(own, own)].sum(1) / (n_own - 1)
        b = d[np.ix_(own, other)].mean(1)
        s[own] = (b - a) / np.maximum(np.maximum(a, b), 1e-12)
    return float(s.mean())


def cluster_label(feats: np.ndarray, dims: int, seed: int, restarts: int = 10, silhouette_samples: int = 2000
                  ) -> dict[str, Any]:
    """Reduce, split and score one label's features: the smaller cluster's member positions, its relative size,
    the silhouette (on at most ``silhouette_samples`` seeded samples: it costs N^2)."""
    if len(feats) < 2:
        return {"small": np.zeros(0, dtype=np.int64), "relative_size": 0.0, "silhouette": 0.0}
    reduced = pca_reduce(feats, dims)
    labels = two_means(reduced, seed, restarts)
    small = int(np.bincount(labels, minlength=2).argmin())
    sub = np.random.default_rng(seed + 1).permutation(len(reduced))[:silhouette_samples]
    return {"small": np.flatnonzero(labels == small), "relative_size": float((labels == small).mean()),
            "silhouette": silhouette(reduced[sub], labels[sub])}


def precision_recall(called: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """Precision and recall of the called-poisoned training indices against the true poisoned ones (nan where the
    denominator is empty)."""
    hits = len(np.intersect1d(called, truth))
    return {"precision": hits / len(called) if len(called) else float("nan"),
            "recall": hits / len(truth) if len(truth) else float("nan")}


def activation_clustering(feats: torch.Tensor, labels: torch.Tensor, poisoned: np.ndarray, dims: int = 10,
                          size_threshold: float = 0.35, silhouette_threshold: float = 0.10, seed: int = 0,
                          restarts: int = 10, silhouette_samples: int = 2000) -> dict[str, Any]:
    """Activation Clustering over every label of the (possibly poisoned) training set; ``poisoned`` are the true
    poisoned indices (empty for a clean model), used only to score the result."""
    f, y = feats.double().numpy(), labels.numpy()
    per_label, called = [], []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        r = cluster_label(f[idx], dims, seed + int(c), restarts, silhouette_samples)
        flagged = r["relative_size"] <= size_threshold and r["silhouette"] >= silhouette_threshold
        if flagged:
            called.append(idx[r["small"]])
        per_label.append({"label": int(c), "samples": len(idx), "relative_size": r["relative_size"],
                          "silhouette": r["silhouette"], "flagged": bool(flagged),
                          "poisoned_in_label": int(np.isin(idx, poisoned).sum())})
    called_idx = np.sort(np.concatenate(called)) if called else np.zeros(0, dtype=np.int64)
    flagged_labels = [r["label"] for r in per_label if r["flagged"]]
    return {"labels": per_label, "flagged_labels": flagged_labels, "flagged": bool(flagged_labels),
            "called_poisoned": len(called_idx),
            **{f"poison_{k}": v for k, v in precision_recall(called_idx, np.asarray(poisoned)).items()}}


def training_features(ctx: DefenseContext, batch_size: int) -> tuple[torch.Tensor, torch.Tensor, np.ndarray,
                                                                    int | None]:
    """Penultimate features of the training set the model was trained on (poisoned for an attack), computed by the
    model as deployed; its labels, the true poisoned indices and the poison target (None if nothing poisoned)."""
    x, y = ctx.training_set()
    rec = PoisonRecord.load(ctx.poison)
    feats = penultimate_features(ctx.model, x, batch_size, ctx.job.device)
    return feats, y, rec.indices.numpy(), (rec.target if len(rec.indices) else None)


def run(ctx: DefenseContext) -> DefenseResult:
    """Activation Clustering of the training set, with the features of the model as deployed."""
    cfg = ctx.config
    feats, y, poisoned, target = training_features(ctx, int(cfg["batch_size"]))
    result = activation_clustering(feats, y, poisoned, int(cfg["dims"]), float(cfg["size_threshold"]),
                                   float(cfg["silhouette_threshold"]), derived_seed(ctx.run.seed, "ac"),
                                   int(cfg["restarts"]), int(cfg["silhouette_samples"]))
    print({k: result[k] for k in ("flagged_labels", "poison_precision", "poison_recall")})
    return DefenseResult(result["flagged"], None if target is None else target in result["flagged_labels"],
                         details={"target": target, "feature_dims": feats.shape[1], "poisoned": len(poisoned),
                                  **result})
