"""Neural Cleanse (Wang et al., S&P 2019): trigger reverse-engineering and outlier detection.

For every class, a mask m (32x32, in [0, 1]) and a pattern p (3x32x32, in [0, 1]) are optimised with Adam so
that x' = (1 - m) x + m p is classified as that class, with a cost on the L1 norm of m. Two cost schedules
(``NCConfig.schedule``), both deciding once per epoch from that epoch's attack success and the mask norm:

- ``fast`` (this project's default, for small budgets): the cost starts at 1e-3, is multiplied by 2 after
  ``patience`` (2) consecutive epochs whose attack success reaches the threshold (0.98) and divided by 2^1.5 after
  ``patience`` epochs below it; a new best mask must be below 0.99 x the old best; optimisation stops when the best
  has not improved for ``early_stop_patience`` (6) epochs.
- ``original`` (the schedule of Wang et al.'s public implementation): the cost starts at 0 and is set to 1e-3 once
  the attack has succeeded (threshold 0.99) for ``patience`` (5) consecutive epochs; then x2 after ``patience``
  successful epochs, /2^1.5 after ``patience`` failed ones; the best mask is the smallest successful one; early
  stop after ``early_stop_patience`` (25) epochs in which the best norm did not fall below 1.0 x its earlier best,
  and only once the cost has moved both up and down. (The original compares the epoch's mean mask norm over its
  mini-batches; here the end-of-epoch norm, the norm of the mask that is kept.) Its cost is 0 for at least
  ``patience`` epochs and its early stop needs ``early_stop_patience`` more, so it is refused with fewer epochs
  than the two together.

Two budgets (``neural_cleanse.budget``): ``fast`` (this project's default) takes the config's ``optimizer``
block, ``schedule`` and ``images``, one pass over the images per epoch and a mask and pattern started near 0.5;
``original`` takes every constant from Wang et al.'s public implementation (:data:`ORIGINAL_SCHEDULE`,
:data:`ORIGINAL_BUDGET`) and optimises on the whole test set, ignoring those keys.

The smallest mask reaching the threshold is kept. A class is an outlier when its norm lies at or below the median
and its anomaly index |norm - median| / (1.4826 * MAD) exceeds 2.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..runtime import derived_seed, to_input
from . import DefenseContext, DefenseResult

DEFENSE = {"name": "neural_cleanse", "title": "Neural Cleanse", "level": "model", "artifacts": True}
MAD_CONSTANT = 1.4826
NC_SCHEDULES = ("fast", "original")
# Wang et al.'s public implementation, bolunwang/backdoor at commit e857774, gtsrb_visualize_example.py (the
# script the authors ran; it passes these to visualizer.py's Visualizer, whose own class defaults - patience 10,
# multiplier 1.5 written as the tuple ``1.5,``, early-stop threshold 0.99 - it overrides): INIT_COST 1e-3,
# ATTACK_SUCC_THRESHOLD 0.99, PATIENCE 5, COST_MULTIPLIER 2 (down: 2 ** 1.5, visualizer.py), EARLY_STOP_THRESHOLD
# 1.0, EARLY_STOP_PATIENCE 5 * PATIENCE. Keys given explicitly in the config still override them.
ORIGINAL_SCHEDULE = {"init_cost": 1e-3, "cost_up": 2.0, "cost_down": 2.0 ** 1.5, "attack_threshold": 0.99,
                     "patience": 5, "early_stop_patience": 25, "early_stop_threshold": 1.0}
# the same script's budget: STEPS 1000 epochs of MINI_BATCH = NB_SAMPLE // BATCH_SIZE = 1000 // 32 = 31 mini-batches
# of BATCH_SIZE 32 drawn from a reshuffling stream over the whole test set (X_test), Adam at LR 0.1 (betas 0.5 and
# 0.9, visualizer.py), mask and pattern started uniformly at random (np.random.random) and reset cost 0
ORIGINAL_BUDGET = {**ORIGINAL_SCHEDULE, "schedule": "original", "epochs": 1000, "mini_batches": 31,
                   "batch_size": 32, "lr": 0.1, "init": "uniform"}
NC_BUDGETS = ("fast", "original")
NC_INITS = ("near_half", "uniform")


@dataclass
class NCConfig:
    epochs: int = 20            # passes over the clean images per class (the budget)
    batch_size: int = 32
    lr: float = 0.1
    init_cost: float = 1e-3
    cost_up: float = 2.0
    cost_down: float = 2.0 ** 1.5
    attack_threshold: float = 0.98
    patience: int = 2
    early_stop_patience: int = 6
    early_stop_threshold: float = 0.99  # a new best must be below this fraction of the old one
    anomaly_threshold: float = 2.0
    schedule: str = "fast"
    mini_batches: int | None = None  # batches per epoch from a reshuffling stream; None: one pass over the images
    init: str = "near_half"     # near_half: mask ~0.5 +- 0.05, pattern in [0.12, 0.88]; uniform: both U[0, 1)

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "NCConfig":
        d = dict(d or {})
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"neural_cleanse: unknown key(s) {sorted(unknown)}")
        schedule = d.get("schedule", "fast")
        if schedule not in NC_SCHEDULES:
            raise ValueError(f"neural_cleanse.schedule must be one of {NC_SCHEDULES}, got {schedule!r}")
        cfg = cls(**{**(ORIGINAL_SCHEDULE if schedule == "original" else {}), **d})
        for name in ("epochs", "batch_size", "patience", "early_stop_patience"):
            if getattr(cfg, name) < 1:
                raise ValueError(f"neural_cleanse.optimizer.{name} must be at least 1, got {getattr(cfg, name)}")
        if cfg.init not in NC_INITS:
            raise ValueError(f"neural_cleanse init must be one of {NC_INITS}, got {cfg.init!r}")
        if cfg.schedule == "original" and cfg.epochs <= cfg.patience + cfg.early_stop_patience:
            raise ValueError(f"neural_cleanse: the original schedule keeps the cost at 0 for {cfg.patience} epochs "
                             f"and stops early only after {cfg.early_stop_patience} more, so {cfg.epochs} epochs "
                             "never let it run its course: use budget: original (its 1000 epochs), more epochs, or "
                             "schedule: fast")
        return cfg

    @classmethod
    def for_budget(cls, budget: str, optimizer: dict[str, Any] | None, schedule: str) -> "NCConfig":
        """The optimisation of a budget: ``original``: Wang et al.'s constants alone; ``fast``: the config's
        ``optimizer`` block under ``schedule``."""
        if budget not in NC_BUDGETS:
            raise ValueError(f"neural_cleanse.budget must be one of {NC_BUDGETS}, got {budget!r}")
        if budget == "original":
            return cls.from_dict(ORIGINAL_BUDGET)
        return cls.from_dict({**(optimizer or {}), "schedule": schedule})


class CostSchedule:
    """The per-epoch decisions of either schedule: the cost, whether the epoch's mask is a new best, and whether to
    stop. Pure bookkeeping (no tensors), so the schedule can be checked epoch by epoch on hand-worked numbers."""

    def __init__(self, cfg: NCConfig):
        self.cfg = cfg
        self.original = cfg.schedule == "original"
        self.cost = 0.0 if self.original else cfg.init_cost
        self.up = self.down = self.set_count = self.stale = 0
        self.moved_up = self.moved_down = False
        self.best = float("inf")       # norm of the kept mask
        self.stop_ref = float("inf")   # original: the best norm the early-stop counter compares against

    def step(self, asr: float, l1: float) -> tuple[bool, bool]:
        """Record one epoch; return (keep this epoch's mask as the new best, stop now). ``self.cost`` is then the
        cost of the next epoch."""
        cfg = self.cfg
        success = asr >= cfg.attack_threshold
        if self.original:
            improved = success and l1 < self.best
            if improved:
                self.best = l1
            if self.best < float("inf"):
                self.stale = self.stale + 1 if self.best >= cfg.early_stop_threshold * self.stop_ref else 0
                self.stop_ref = min(self.stop_ref, self.best)
            if self.moved_up and self.moved_down and self.stale >= cfg.early_stop_patience:
                return improved, True
            if self.cost == 0 and success:  # the cost is switched on only once the attack works without it
                self.set_count += 1
                if self.set_count >= cfg.patience:
                    self.cost, self.up, self.down = cfg.init_cost, 0, 0
                    self.moved_up = self.moved_down = False
            else:
                self.set_count = 0
        else:
            improved = success and l1 < self.best * cfg.early_stop_threshold
            if improved:
                self.best = l1
            self.stale = 0 if improved else self.stale + 1
        self.up, self.down = (self.up + 1, 0) if success else (0, self.down + 1)
        if self.up >= cfg.patience:
            self.cost, self.up, self.moved_up = self.cost * cfg.cost_up, 0, True
        elif self.down >= cfg.patience:
            self.cost, self.down, self.moved_down = self.cost / cfg.cost_down, 0, True
        stop = not self.original and self.best < float("inf") and self.stale >= cfg.early_stop_patience
        return improved, stop


def batch_stream(n: int, batch_size: int, gen: torch.Generator):
    """Index batches through successive seeded permutations of ``n`` items, each pass ending in its partial batch
    (as Keras's shuffling iterator, which the original draws its mini-batches from)."""
    while True:
        perm = torch.randperm(n, generator=gen)
        for start in range(0, n, batch_size):
            yield perm[start:start + batch_size]


def reverse_engineer(model: nn.Module, x: torch.Tensor, target: int, cfg: NCConfig, seed: int = 0,
                     device: torch.device | None = None) -> dict[str, Any]:
    """Optimise a mask and pattern that send the uint8 images ``x`` to ``target``; return the best found."""
    device = device or next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    model.eval()
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:  # only the mask and pattern are optimised; restored before returning
        p.requires_grad_(False)
    # tanh parameterisation keeps mask and pattern in [0, 1]
    if cfg.init == "uniform":  # values drawn uniformly in [0, 1), mapped back through tanh / 2 + 0.5
        to_param = lambda v: torch.atanh((v * 2 - 1).clamp(-1 + 1e-6, 1 - 1e-6))  # noqa: E731
        mask_param = to_param(torch.rand(1, 1, 32, 32, generator=gen)).to(device).requires_grad_()
        pattern_param = to_param(torch.rand(1, 3, 32, 32, generator=gen)).to(device).requires_grad_()
    else:
        mask_param = (torch.rand(1, 1, 32, 32, generator=gen) * 0.2 - 0.1).to(device).requires_grad_()
        pattern_param = (torch.rand(1, 3, 32, 32, generator=gen) * 2 - 1).to(device).requires_grad_()
    opt = torch.optim.Adam([mask_param, pattern_param], lr=cfg.lr, betas=(0.5, 0.9))
    y = torch.full((cfg.batch_size,), target, dtype=torch.long, device=device)
    schedule = CostSchedule(cfg)
    best = {"l1": float("inf"), "mask": None, "pattern": None, "asr": 0.0}
    n = x.shape[0]
    batches = batch_stream(n, cfg.batch_size, gen)
    per_epoch = cfg.mini_batches or -(-n // cfg.batch_size)
    for epoch in range(cfg.epochs):
        hits, seen = 0.0, 0
        for _ in range(per_epoch):
            xb = to_input(x[next(batches)].to(device))
            mask = torch.tanh(mask_param) / 2 + 0.5
            pattern = torch.tanh(pattern_param) / 2 + 0.5
            logits = model((1 - mask) * xb + mask * pattern)
            yb = y[: xb.shape[0]]
            loss = F.cross_entropy(logits, yb) + schedule.cost * mask.abs().sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            hits += float((logits.argmax(1) == yb).sum())
            seen += xb.shape[0]
        asr = hits / seen
        with torch.no_grad():
            mask = torch.tanh(mask_param) / 2 + 0.5
            l1 = float(mask.sum())
        improved, stop = schedule.step(asr, l1)
        if improved:
            best = {"l1": l1, "mask": mask.detach().cpu()[0, 0],
                    "pattern": (torch.tanh(pattern_param) / 2 + 0.5).detach().cpu()[0], "asr": asr}
        if stop:
            break
    if best["mask"] is None:  # never reached the threshold: report the last mask (its norm is an upper bound)
        with torch.no_grad():
            best = {"l1": float((torch.tanh(mask_param) / 2 + 0.5).sum()),
                    "mask": (torch.tanh(mask_param) / 2 + 0.5).detach().cpu()[0, 0],
                    "pattern": (torch.tanh(pattern_param) / 2 + 0.5).detach().cpu()[0], "asr": asr}
    best["epochs_run"] = epoch + 1
    best["reached_threshold"] = best["asr"] >= cfg.attack_threshold
    for p in trainable:
        p.requires_grad_(True)
    return best


def anomaly_indices(norms: np.ndarray) -> np.ndarray:
    """|norm - median| / (1.4826 * median absolute deviation) per class."""
    norms = np.asarray(norms, dtype=np.float64)
    med = np.median(norms)
    mad = MAD_CONSTANT * np.median(np.abs(norms - med))
    return np.abs(norms - med) / max(mad, 1e-12)


def detect(norms: np.ndarray, classes: list[int], threshold: float = 2.0) -> dict[str, Any]:
    """Flag the model if a class with a norm at or below the median has an anomaly index above ``threshold``."""
    norms = np.asarray(norms, dtype=np.float64)
    index = anomaly_indices(norms)
    low = norms <= np.median(norms)
    candidates = np.flatnonzero(low & (index > threshold))
    flagged_class = int(classes[candidates[np.argmax(index[candidates])]]) if len(candidates) else None
    return {"anomaly_index": index.tolist(), "flagged": bool(len(candidates)), "flagged_class": flagged_class,
            "max_low_anomaly_index": float(index[low].max())}


def neural_cleanse(model: nn.Module, x: torch.Tensor, classes: list[int], cfg: NCConfig, seed: int = 0,
                   device: torch.device | None = None) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Run the reverse engineering for every class in ``classes``; return the detection and the masks."""
    results, masks = [], {}
    for c in classes:
        r = reverse_engineer(model, x, c, cfg, seed=seed * 1000 + c, device=device)
        results.append({"class": c, "l1": r["l1"], "asr": r["asr"], "epochs_run": r["epochs_run"],
                        "reached_threshold": r["reached_threshold"]})
        masks[f"mask_{c}"], masks[f"pattern_{c}"] = r["mask"], r["pattern"]
    norms = np.array([r["l1"] for r in results])
    summary = {"config": asdict(cfg), "classes": results, **detect(norms, classes, cfg.anomaly_threshold)}
    return summary, masks


def run(ctx: DefenseContext) -> DefenseResult:
    """Neural Cleanse on the model as deployed, with ``images`` clean test images (a seeded draw; the whole test
    set under ``budget: original``) and the classes ``0 .. classes - 1`` (every class when null); the reversed
    masks and patterns are its artifacts."""
    cfg, job = ctx.config, ctx.job
    order = np.random.default_rng(derived_seed(ctx.run.seed, "nc-images")).permutation(len(job.y_test))
    images = len(order) if cfg["budget"] == "original" else int(cfg["images"])
    x = job.x_test[torch.from_numpy(order[:images])]
    classes = cfg["classes"]
    class_list = list(range(job.num_classes if classes is None else min(classes, job.num_classes)))
    optimizer = NCConfig.for_budget(cfg["budget"], cfg.get("optimizer"), cfg["schedule"])
    summary, masks = neural_cleanse(ctx.model, x, class_list, optimizer,
                                    seed=derived_seed(ctx.run.seed, "nc"), device=job.device)
    detected = bool(summary["flagged"] and summary["flagged_class"] == ctx.target)
    print({k: summary[k] for k in ("flagged", "flagged_class")})
    return DefenseResult(summary["flagged"], detected,
                         details={"images": len(x), "budget": cfg["budget"], **summary,
                                  "detected_target": detected},
                         artifacts=masks, artifacts_metadata={"classes": class_list})
