"""A backdoor that knows the router-guided defense: poisoned training plus a term that keeps the trigger's patches
out of every router's top-k.

The router-guided patch ablation (:mod:`pmoe_backdoor.defenses.router_ablation`) ranks the 64 positions of the 8x8
pre-MoE map by the routers' probabilities (max over experts) and occludes the top ``top_m``. A plainly backdoored
pMoE routes the trigger's patch to the experts, so it ranks high and its occlusion can undo the backdoor. This
attacker adds, on the batch's poisoned (triggered) images, a hinge that pushes every trigger position below the
k-th best other position of every expert:

    loss = CE(model(x), y) + weight * mean over (image, expert) of
           relu(max_{p in trigger} s[e, p] - kth_largest_{q not in trigger} s[e, q] + margin)

with ``k = model.moe.top_k`` and ``s`` each expert's log-softmax over the positions (:func:`routing_log_probs` says
why). With ``margin >= 0`` the term is zero only when no trigger position is in that expert's top-k. A position
outside every expert's top-k has k positions above it under the expert where it scores best, hence under the max:
it ranks k-th or lower in the defense's ``combine: max`` ranking, far below ``top_m`` (4). The trigger can still
drive the prediction through the routed positions around it, whose features see it (receptive field 17x17 px).
:func:`trigger_rank_stats` measures how often the trigger still reaches the experts.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, fields
from typing import Any, TextIO

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..evaluate import evaluate
from ..models import routing
from ..runtime import autocast, effective_precision, resolve_device, to_input
from ..training.engine import new_history, note_precision, resolve_log, run_epochs
from ..training.loop import (
    Probe,
    TrainConfig,
    describe_row,
    finish_epoch,
    prepare_model,
    record_routing,
    train_schedule,
)
from .triggers import Trigger

POSITIONS = routing.GRID * routing.GRID


def trigger_positions(trigger: Trigger) -> list[int]:
    """The 8x8-grid positions (row-major, 0..63) whose 4x4-pixel patch overlaps the trigger's pixel box; only
    patch-located triggers (the square) have one."""
    spec = getattr(trigger, "spec", None)
    if spec is None or not spec.patch_located or not hasattr(trigger, "pixel_box"):
        raise ValueError(f"router evasion needs a patch-located trigger (one that writes a fixed pixel box, such as "
                         f"'square'); {getattr(trigger, 'kind', type(trigger).__name__)!r} is not")
    return routing.trigger_positions(trigger)


def _check_positions(positions: list[int] | torch.Tensor, top_k: int) -> torch.Tensor:
    positions = torch.as_tensor(positions, dtype=torch.long).flatten()
    if len(positions) == 0 or len(positions.unique()) != len(positions) or not 0 <= int(positions.min()) \
            or int(positions.max()) >= POSITIONS:
        raise ValueError(f"trigger positions must be distinct, at least one, in 0..63; got {positions.tolist()}")
    if POSITIONS - len(positions) < top_k:
        raise ValueError(f"{len(positions)} trigger positions leave fewer than top_k={top_k} other positions to "
                         "fill the experts' top-k")
    return positions


def routing_log_probs(moe: nn.Module, feats: torch.Tensor) -> torch.Tensor:
    """Each expert's log-softmax over the positions (B, E, 64), in fp32: the log of ``moe.routing_probs``.

    Log-probabilities rather than probabilities: the same ranking (so the same top-k), and within one expert the
    difference of two is the difference of the router's raw scores (the normaliser cancels), so ``margin`` nats is
    a fixed odds ratio (trigger at most exp(-margin) times the k-th other) however peaked the softmax is. Near the
    routers' initialisation (std 1e-4) all 64 probabilities sit within ~1e-6 of 1/64, where a probability margin
    would mean nothing; and log_softmax does not underflow where the log of a tiny probability would.
    """
    return moe.router(feats).flatten(2).float().log_softmax(dim=-1)


def evasion_loss_from_features(moe: nn.Module, feats: torch.Tensor, positions: list[int] | torch.Tensor,
                               margin: float = 0.0) -> torch.Tensor:
    """:func:`evasion_loss` from the shared pre-MoE map ``feats`` (B, C, 8, 8) that the routers read (the training
    step reuses its forward pass's map). Zero for an empty batch."""
    if feats.shape[0] == 0:
        return feats.sum() * 0.0  # keeps the graph (and the device) of a real term
    k, positions = int(moe.top_k), _check_positions(positions, int(moe.top_k)).to(feats.device)
    scores = routing_log_probs(moe, feats)  # (B, E, 64)
    trigger_best = scores[..., positions].amax(dim=-1)  # (B, E)
    is_trigger = torch.zeros(POSITIONS, dtype=torch.bool, device=feats.device).index_fill_(0, positions, True)
    # -inf never reaches the top-k of the others: 64 - |trigger| >= k is checked
    others = scores.masked_fill(is_trigger, float("-inf"))
    kth_other = others.topk(k, dim=-1).values[..., -1]  # (B, E)
    return F.relu(trigger_best - kth_other + margin).mean()


def evasion_loss(model: nn.Module, x_triggered: torch.Tensor, positions: list[int] | torch.Tensor,
                 margin: float = 0.0) -> torch.Tensor:
    """The differentiable hinge that pushes the trigger's ``positions`` out of every expert's top-k on the triggered
    float images ``x_triggered`` (B, 3, 32, 32) in [0, 1]: the mean over (image, expert) of relu(best trigger
    log-probability - k-th largest log-probability of the other positions + ``margin``), k = ``model.moe.top_k``.
    Zero exactly when, for every image and expert, each trigger position scores at least ``margin`` nats below k
    other positions (so with ``margin`` > 0 none is selected). The model's mode (train / eval) is the caller's."""
    return evasion_loss_from_features(model.moe, model.features(x_triggered), positions, margin)


def best_trigger_rank(scores: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """(..., 64) scores -> (...): the best rank of a trigger position, a rank being how many positions score
    strictly higher (0 = top; tied positions share the better rank)."""
    return (scores.unsqueeze(-2) > scores[..., positions].unsqueeze(-1)).sum(dim=-1).amin(dim=-1)


@torch.no_grad()
def trigger_rank_stats(model: nn.Module, x_triggered: torch.Tensor, positions: list[int] | torch.Tensor,
                       batch_size: int = 500, top_m: int = 4) -> dict[str, Any]:
    """How far the routers let the trigger in, on triggered images (uint8 (N, 32, 32, 3), or float (N, 3, 32, 32)
    in [0, 1]), in eval mode:

    - ``expert_selection_rate``: the share of (image, expert) pairs where some trigger position is in the expert's
      top-k (the model's own routing, ties broken as its forward breaks them);
    - ``image_reach_rate``: the share of images where it is for at least one expert (the authors' "the trigger
      patch reaches at least one expert");
    - ``mean_best_rank``: the mean over (image, expert) of the best rank of a trigger position in that expert's
      ordering (0 = top; ``per_expert_best_rank`` per expert);
    - ``defense_rank`` / ``defense_top_m_rate``: the best trigger position's rank under the router-guided defense's
      ``combine: max`` score (max over experts of the probability), and the share of images where it falls in the
      defense's top ``top_m`` suspects.
    """
    moe = model.moe
    k = int(moe.top_k)
    device = next(model.parameters()).device
    positions = _check_positions(positions, k).to(device)
    was_training = model.training
    model.eval()
    selected, best_rank, defense_rank = [], [], []
    try:
        for start in range(0, len(x_triggered), batch_size):
            xb = x_triggered[start:start + batch_size].to(device)
            xb = xb.contiguous() if xb.is_floating_point() else to_input(xb, channels_last=False)
            probs = moe.routing_probs(model.features(xb))  # (B, E, 64)
            top_idx = probs.topk(k, dim=-1).indices
            selected.append(torch.isin(top_idx, positions).any(dim=-1).cpu())
            best_rank.append(best_trigger_rank(probs, positions).cpu())
            defense_rank.append(best_trigger_rank(probs.amax(dim=1), positions).cpu())  # the defense's ranking
    finally:
        model.train(was_training)
    if not selected:
        raise ValueError("trigger_rank_stats needs at least one triggered image")
    hit, rank, drank = torch.cat(selected).double(), torch.cat(best_rank).double(), torch.cat(defense_rank).double()
    return {"n_images": int(hit.shape[0]), "top_k": k, "positions": positions.tolist(),
            "expert_selection_rate": float(hit.mean()), "image_reach_rate": float(hit.amax(dim=1).mean()),
            "mean_best_rank": float(rank.mean()), "per_expert_best_rank": rank.mean(dim=0).tolist(),
            "per_expert_selection_rate": hit.mean(dim=0).tolist(), "defense_rank": float(drank.mean()),
            "defense_top_m": top_m,
            "defense_top_m_rate": float((drank < top_m).double().mean())}


@dataclass
class EvasionConfig:
    """The evasion term of an attack (beside the run's :class:`TrainConfig` recipe): its ``weight`` and ``margin``
    (nats of router log-probability, :func:`routing_log_probs`), and how many triggered test images the per-epoch
    routing measure uses. ``weight: 0`` is ordinary poisoned training through the same step (the baseline)."""

    weight: float = 1.0
    # a buffer so that the trigger stays out in eval mode too, where BN's running statistics replace the batch's
    margin: float = 0.5
    rank_images: int = 1000  # triggered test images the routing measure uses (the first ones of x_asr)

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "EvasionConfig":
        d, known = dict(d or {}), {f.name for f in fields(cls)}
        if set(d) - known:
            raise ValueError(f"router evasion config: unknown key(s) {sorted(set(d) - known)}; known: {sorted(known)}")
        cfg = cls(**d)
        cfg.check()
        return cfg

    def check(self) -> None:
        # a negative margin would let the trigger stay in the top-k
        if self.weight < 0 or self.margin < 0 or int(self.rank_images) < 1:
            raise ValueError(f"router evasion: need weight, margin >= 0 and rank_images >= 1; got weight "
                             f"{self.weight}, margin {self.margin}, rank_images {self.rank_images}")


class RouterEvasionStep:
    """One model, SGD on CE(model(x), y) + weight * evasion_loss on the batch's poisoned images. The evasion term
    reads the routers from the same forward pass's pre-MoE map (one pass, and BatchNorm sees the whole batch, as
    in plain training); a batch without poisoned images adds nothing. After an epoch it does what ``fit``'s step
    does (BN recalibration, test accuracy, the probe's routing) and, given triggered test images, measures ASR and
    how far the routers let the trigger in."""

    model_count = 1

    def __init__(self, model: nn.Module, data: tuple[torch.Tensor, torch.Tensor, torch.Tensor], positions: list[int],
                 cfg: TrainConfig, evasion: EvasionConfig, test: tuple[torch.Tensor | None, torch.Tensor | None],
                 x_asr: torch.Tensor | None, target: int, history: dict[str, Any], probe: Probe | None,
                 device: torch.device, precision: str):
        self.model, (self.x_train, self.y_train, self.poisoned) = model, data
        self.positions = _check_positions(positions, model.moe.top_k).tolist()
        self.cfg, self.evasion, (self.x_test, self.y_test), self.x_asr, self.target = cfg, evasion, test, x_asr, target
        self.history, self.probe, self.device, self.precision = history, probe, device, precision
        self.optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                         nesterov=cfg.nesterov, weight_decay=cfg.weight_decay)

    def start_epoch(self, epoch: int) -> None:
        self.model.train()
        # summed CE, summed evasion term (per batch with poisoned images), correct predictions
        self.sums = torch.zeros(3, device=self.device)
        self.evasion_batches = 0

    def train_batch(self, idx: torch.Tensor) -> None:
        model, weight = self.model, self.evasion.weight
        xb, yb, poisoned = to_input(self.x_train[idx], self.cfg.channels_last), self.y_train[idx], self.poisoned[idx]
        # weight 0 skips the term entirely, so the baseline is exactly plain poisoned training; the boolean index
        # needs the mask's count, one host synchronisation per batch, a small cost beside the step's convolutions
        evade = weight > 0 and bool(poisoned.any())
        with autocast(self.device, self.precision):  # the routers read the map in the pass's own precision
            feats = model.features(xb)
            logits = model.head(model.moe(feats)[0])
            evasion = evasion_loss_from_features(model.moe, feats[poisoned], self.positions,
                                                 self.evasion.margin) if evade else None
        ce = F.cross_entropy(logits.float(), yb)
        loss = ce
        if evasion is not None:
            loss = ce + weight * evasion
            self.sums[1] += evasion.detach()
            self.evasion_batches += 1
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.sums[0] += ce.detach() * yb.shape[0]
        self.sums[2] += (logits.detach().argmax(1) == yb).sum()

    def end_epoch(self, epoch: int, seconds: float, evaluate_now: bool) -> list[dict[str, Any]]:
        n = self.x_train.shape[0]
        sums = self.sums.tolist()
        row: dict[str, Any] = {"epoch": epoch, "train_loss": sums[0] / n,
                               "train_evasion": sums[1] / max(1, self.evasion_batches),
                               "train_acc": sums[2] / n, "train_seconds": seconds, "images_per_s": n / seconds}
        finish_epoch(self.model, row, self.history, self.cfg, epoch, evaluate_now, self.x_train, self.x_test,
                     self.y_test, self.probe, self.device, self.precision)
        if evaluate_now and self.x_asr is not None and len(self.x_asr):
            t0 = time.perf_counter()
            result = evaluate(self.model, self.x_test, self.y_test, self.x_asr, self.target,
                              batch_size=self.cfg.eval_batch_size, device=self.device)
            row.update({key: result[key] for key in ("ba", "asr") if key in result})
            stats = trigger_rank_stats(self.model, self.x_asr[:self.evasion.rank_images], self.positions,
                                       self.cfg.eval_batch_size)
            row.update({key: stats[key] for key in ("expert_selection_rate", "image_reach_rate",
                                                    "mean_best_rank", "defense_rank", "defense_top_m_rate")})
            row["eval_seconds"] = row.get("eval_seconds", 0.0) + time.perf_counter() - t0
        return [row]

    def describe(self, row: dict[str, Any]) -> str:
        text = f"{describe_row(row)} evasion {row['train_evasion']:.4f}"
        text += "".join(f" {key} {row[key]:.2f}" for key in ("ba", "asr") if key in row)
        if "expert_selection_rate" in row:
            text += (f" selected {row['expert_selection_rate']:.3f} reached {row['image_reach_rate']:.3f}"
                     f" rank {row['mean_best_rank']:.1f}")
        return text


def fit_router_evasive(model: nn.Module, x_train: torch.Tensor, y_train: torch.Tensor, poisoned_mask: torch.Tensor,
                       trigger: Trigger, cfg: TrainConfig, evasion: EvasionConfig, x_test: torch.Tensor | None = None,
                       y_test: torch.Tensor | None = None, x_asr: torch.Tensor | None = None, target: int = 0,
                       probe: Probe | None = None, device: torch.device | None = None,
                       log: TextIO | None | str = "stderr") -> dict[str, Any]:
    """``fit`` with the router-evasion term: train the pMoE ``model`` in place with the run's recipe ``cfg`` on the
    poisoned training set (``x_train`` uint8 (N, 32, 32, 3) with the triggered images in place, ``y_train`` their
    labels, ``poisoned_mask`` bool (N,) marking them, as :meth:`PoisonRecord.apply` and its ``indices`` give);
    return the history, whose rows hold ``fit``'s metrics and, given triggered test images ``x_asr``, BA and ASR
    (%, :func:`pmoe_backdoor.evaluate.evaluate`) and :func:`trigger_rank_stats` on the first ``rank_images``.

    Shuffling comes from ``cfg.seed`` (the step draws nothing else); the caller seeds the model's initialisation,
    as for ``fit``. The same seed on the same CPU gives the same weights."""
    cfg.check()
    evasion.check()
    if not isinstance(getattr(model, "moe", None), nn.Module) or not hasattr(model.moe, "top_k"):
        raise TypeError(f"router evasion trains a pMoE's routers; {type(model).__name__} has none")
    poisoned_mask = torch.as_tensor(poisoned_mask, dtype=torch.bool)
    if poisoned_mask.shape != (x_train.shape[0],) or y_train.shape[0] != x_train.shape[0]:
        raise ValueError(f"x_train {tuple(x_train.shape)}, y_train {tuple(y_train.shape)} and poisoned_mask "
                         f"{tuple(poisoned_mask.shape)} must describe the same images")
    positions = trigger_positions(trigger)
    log = resolve_log(log)
    device = device or resolve_device()
    precision = effective_precision(device, cfg.precision)
    note_precision(log, device, cfg.precision, precision)
    model = prepare_model(model, device, cfg)
    data = (x_train.to(device), y_train.to(device), poisoned_mask.to(device))
    history = new_history(cfg, device, precision, routing=[], probe_names=probe.names if probe else [],
                          trigger_positions=positions, poisoned=int(poisoned_mask.sum()),
                          router_evasion=asdict(evasion))
    if probe is not None:
        history["routing_init"] = record_routing(model, probe, device, cfg.channels_last)
    step = RouterEvasionStep(model, data, positions, cfg, evasion, (x_test, y_test), x_asr, target, history, probe,
                             device, precision)
    run_epochs(step, x_train.shape[0], train_schedule(cfg, [cfg.seed]), [history], device, log)
    return history
