"""Activation Clustering (Chen et al., 2018): poisoned training samples of a label separate from the clean ones in
the network's last hidden layer.

Per label, the penultimate activations (the input of the final linear layer: the head's pooled features, 640-d at
the paper's width) of every training sample carrying that label are reduced to ``dims`` (10) dimensions and split by
2-means (k-means++ seeding, ``restarts`` seeded restarts, the lowest inertia kept).

``reduction``: ``pca`` (default): the top ``dims`` principal scores; ``ica`` (Chen et al.'s): FastICA (logcosh
contrast, symmetric decorrelation, seeded start) on the label's centred features whitened onto their top ``dims``
principal directions, sources of unit variance. The ICA unmixing is an orthogonal rotation of the whitened scores and
2-means depends only on distances, so ``ica`` splits the *whitened* principal scores: every direction weighs as much
as the poison's, and heavy-tailed low-variance ones can win. Measured on the tests' TinyNet features (32-d, ~100
samples per label): PCA separates the poison exactly at 5 and 10 % poisoning, ICA splits off 22 of 30 poisoned
samples at 5 % and 7 outliers at 10 %; hence the departure.

``rule``, which cluster of a label (if any) is called poisonous:

- ``exclusionary`` (Chen et al.'s exclusionary reclassification): each of the label's two clusters is classified by
  a model of all the training data *except that cluster*, and is poisonous when fewer of its samples are classified
  as their own label than as the most frequent other label (l / p below ``reclassification_threshold``, 1).
  Departure: Chen et al. retrain the network without the cluster; here the model is a nearest-class-mean classifier
  on the penultimate features of the trained model (the class means recomputed without the cluster), which costs no
  training. Each cluster is judged on its own, so in a poison-majority label both can be poisonous (without its
  clean part the label is represented by the poison alone): then the whole label is called.
- ``size``: the smaller cluster, when it holds at most ``size_threshold`` of the label and the split's silhouette is
  at least ``silhouette_threshold`` (the relative-size criterion; it calls the clean part of a poison-majority
  label);
- ``silhouette``: the smaller cluster, when the silhouette alone is at least ``silhouette_threshold``.

The samples of the called clusters are the ones called poisoned; a label is flagged when one of its clusters is
called, and the model when any label is.
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


RULES = ("exclusionary", "size", "silhouette")
REDUCTIONS = ("ica", "pca")
def pca_reduce(feats: np.ndarray, dims: int) -> np.ndarray:
    """Centred data projected on its top ``dims`` principal directions (fewer if there are fewer samples)."""
    centred = feats - feats.mean(0, keepdims=True)
    _, _, vt = np.linalg.svd(centred.astype(np.float64), full_matrices=False)
    return centred @ vt[:dims].T


def fast_ica(feats: np.ndarray, dims: int, seed: int, max_iter: int = 200, tol: float = 1e-4) -> np.ndarray:
    """FastICA (Hyvarinen's fixed point, logcosh contrast, symmetric decorrelation), as scikit-learn's ``FastICA``
    with ``whiten='unit-variance'``: the centred data whitened onto its top ``dims`` principal directions (those
    with a non-negligible variance), unmixed from a seeded Gaussian start; (N, k) sources of unit variance."""
    centred = feats.astype(np.float64) - feats.mean(0, keepdims=True)
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    keep = min(dims, int((s > s[0] * 1e-7).sum())) if len(s) and s[0] > 0 else 0
    if keep == 0:
        return np.zeros((len(feats), 0))
    white = centred @ vt[:keep].T / s[:keep] * np.sqrt(len(feats))  # unit variance per direction

    def decorrelate(w: np.ndarray) -> np.ndarray:  # (W W^T)^(-1/2) W
        vals, vecs = np.linalg.eigh(w @ w.T)
        return vecs @ np.diag(1 / np.sqrt(np.clip(vals, 1e-12, None))) @ vecs.T @ w

    w = decorrelate(np.random.default_rng(seed).standard_normal((keep, keep)))
    for _ in range(max_iter):
        g = np.tanh(white @ w.T)  # (N, k): the contrast's derivative at each source
        new = decorrelate(g.T @ white / len(white) - np.diag((1 - g ** 2).mean(0)) @ w)
        converged = np.max(np.abs(np.abs(np.einsum("ij,ij->i", new, w)) - 1)) < tol
        w = new
        if converged:
            break
    return white @ w.T


def reduce_features(feats: np.ndarray, dims: int, reduction: str, seed: int) -> np.ndarray:
    """One label's features reduced to ``dims`` dimensions by ``reduction`` (``ica`` or ``pca``)."""
    if reduction == "ica":
        return fast_ica(feats, dims, seed)
    if reduction == "pca":
        return pca_reduce(feats, dims)
    raise ValueError(f"activation_clustering.reduction must be one of {REDUCTIONS}, got {reduction!r}")


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


def cluster_label(feats: np.ndarray, dims: int, seed: int, restarts: int = 10, silhouette_samples: int = 2000,
                  reduction: str = "ica") -> dict[str, Any]:
    """Reduce, split and score one label's features: the 0/1 cluster of each sample, the smaller cluster's id and
    relative size, the silhouette (on at most ``silhouette_samples`` seeded samples: it costs N^2)."""
    if len(feats) < 2:
        return {"clusters": np.zeros(len(feats), dtype=np.int64), "small": 0, "relative_size": 0.0,
                "silhouette": 0.0}
    reduced = reduce_features(feats, dims, reduction, seed)
    clusters = two_means(reduced, seed, restarts)
    small = int(np.bincount(clusters, minlength=2).argmin())
    sub = np.random.default_rng(seed + 1).permutation(len(reduced))[:silhouette_samples]
    return {"clusters": clusters, "small": small, "relative_size": float((clusters == small).mean()),
            "silhouette": silhouette(reduced[sub], clusters[sub])}


class ClassMeans:
    """A nearest-class-mean classifier on features, able to leave any set of samples out of the means cheaply."""

    def __init__(self, feats: np.ndarray, labels: np.ndarray):
        self.feats, self.labels = feats, labels
        self.classes = np.unique(labels)
        self.sums = np.stack([feats[labels == c].sum(0) for c in self.classes])
        self.counts = np.array([(labels == c).sum() for c in self.classes], dtype=np.float64)

    def predict_without(self, members: np.ndarray) -> np.ndarray:
        """The labels that the class means of all samples except ``members`` (indices) give those members; a class
        left without samples takes no part."""
        removed_sums = np.stack([self.feats[members[self.labels[members] == c]].sum(0) for c in self.classes])
        removed_counts = np.array([(self.labels[members] == c).sum() for c in self.classes], dtype=np.float64)
        counts = self.counts - removed_counts
        present = counts > 0
        means = (self.sums - removed_sums)[present] / counts[present, None]
        x = self.feats[members]
        d2 = (x ** 2).sum(1)[:, None] - 2 * x @ means.T + (means ** 2).sum(1)[None]
        return self.classes[present][d2.argmin(1)]


def exclusionary_reclassification(classifier: ClassMeans, members: np.ndarray, label: int) -> dict[str, Any]:
    """Classify a cluster (``members``: indices of samples labelled ``label``) by the class means of everything
    else: how many come out as their own label (l), how many as the most frequent other label (p, and which)."""
    predicted = classifier.predict_without(members)
    own = int((predicted == label).sum())
    others = predicted[predicted != label]
    values, counts = np.unique(others, return_counts=True)
    top = int(counts.argmax()) if len(counts) else None
    return {"size": len(members), "own": own, "other": int(counts[top]) if top is not None else 0,
            "other_label": int(values[top]) if top is not None else None}


def precision_recall(called: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """Precision and recall of the called-poisoned training indices against the true poisoned ones (nan where the
    denominator is empty)."""
    hits = len(np.intersect1d(called, truth))
    return {"precision": hits / len(called) if len(called) else float("nan"),
            "recall": hits / len(truth) if len(truth) else float("nan")}


def activation_clustering(feats: torch.Tensor, labels: torch.Tensor, poisoned: np.ndarray, dims: int = 10,
                          size_threshold: float = 0.35, silhouette_threshold: float = 0.10, seed: int = 0,
                          restarts: int = 10, silhouette_samples: int = 2000, rule: str = "exclusionary",
                          reduction: str = "ica", reclassification_threshold: float = 1.0) -> dict[str, Any]:
    """Activation Clustering over every label of the (possibly poisoned) training set; ``poisoned`` are the true
    poisoned indices (empty for a clean model), used only to score the result."""
    if rule not in RULES:
        raise ValueError(f"activation_clustering.rule must be one of {RULES}, got {rule!r}")
    f, y = feats.double().numpy(), labels.numpy()
    classifier = ClassMeans(f, y) if rule == "exclusionary" else None
    per_label, called = [], []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        r = cluster_label(f[idx], dims, seed + int(c), restarts, silhouette_samples, reduction)
        row = {"label": int(c), "samples": len(idx), "relative_size": r["relative_size"],
               "silhouette": r["silhouette"]}
        poisonous: list[int] = []
        if rule == "exclusionary" and r["relative_size"] > 0:
            tests = [exclusionary_reclassification(classifier, idx[r["clusters"] == k], int(c)) for k in (0, 1)]
            # each cluster on its own, as Chen et al.: in a poison-majority label both fail (without its clean part
            # the label is represented by the poison alone), and the whole label is called
            poisonous = [k for k in (0, 1) if tests[k]["own"] < reclassification_threshold * tests[k]["other"]]
            row["reclassification"] = [{**t, "poisonous": k in poisonous} for k, t in enumerate(tests)]
        elif rule == "size":
            if r["relative_size"] <= size_threshold and r["silhouette"] >= silhouette_threshold:
                poisonous = [r["small"]]
        elif rule == "silhouette" and r["silhouette"] >= silhouette_threshold:
            poisonous = [r["small"]]
        members = idx[np.isin(r["clusters"], poisonous)]
        called.append(members)
        per_label.append({**row, "flagged": bool(poisonous), "called": len(members),
                          "poisoned_in_label": int(np.isin(idx, poisoned).sum()),
                          "poisoned_called": int(np.isin(members, poisoned).sum())})
    called_idx = np.sort(np.concatenate(called)) if called else np.zeros(0, dtype=np.int64)
    flagged_labels = [r["label"] for r in per_label if r["flagged"]]
    return {"rule": rule, "reduction": reduction, "labels": per_label, "flagged_labels": flagged_labels,
            "flagged": bool(flagged_labels), "called_poisoned": len(called_idx),
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
                                   int(cfg["restarts"]), int(cfg["silhouette_samples"]), cfg["rule"],
                                   cfg["reduction"], float(cfg["reclassification_threshold"]))
    print({k: result[k] for k in ("flagged_labels", "poison_precision", "poison_recall")})
    return DefenseResult(result["flagged"], None if target is None else target in result["flagged_labels"],
                         details={"target": target, "feature_dims": feats.shape[1], "poisoned": len(poisoned),
                                  **result})
