"""Patch ablation: the shared test of the input-level defenses ``router_ablation`` (the pMoE's routers rank the
patches) and ``saliency_ablation`` (Grad-CAM ranks them, as SentiNet localises a trigger). Not a defense itself
(no ``DEFENSE`` block): the two modules hand it their ranking.

The 32x32 image is the pMoE's 8x8 grid of 4x4-pixel patches; position p is the pixel block rows 4r..4r+3, cols
4c..4c+3 with (r, c) = (p // 8, p % 8), as in :mod:`pmoe_backdoor.models.routing`. Per input:

1. one forward pass gives the predicted label c, its probability p0 and a score for each of the 64 positions (the
   ranking); the top ``top_m`` positions are the suspects;
2. ``top_m`` + 1 occlusions: each suspect alone, then all of them together, each occluded patch filled with
   ``fill``: ``clean_patch`` (default) the same patch of a held-out clean image drawn at random (seeded; a held-out
   input never gets its own patches), ``mean`` the held-out images' mean colour (per channel);
3. the input's score (``score: drop``, the default) is the largest drop of p0 over those occlusions (0 if none
   lowers it): removing a trigger collapses a backdoored prediction's confidence. ``score: drop_or_flip`` scores
   1.0 (above any drop) when an occlusion changes the predicted label; on a model near 50 % accuracy a third to a
   half of the clean inputs change label under four occluded patches (measured on the CIFAR-10 controls), so the
   1 - frr quantile of the clean scores is 1.0 and nothing can exceed it.

An input is called triggered when its score exceeds the threshold, the empirical (linear interpolation) 1 - ``frr``
quantile of the held-out clean inputs' scores, so a share ``frr`` of them is rejected (STRIP's protocol with its
empirical threshold). Cost: 1 + ``top_m`` + 1 forward passes per input (Grad-CAM's ranking pass adds one backward).

Purification: a flagged input's label is the one predicted with all its suspects filled (the last occlusion
above: no extra pass). Model verdict: in a stream of the test inputs where a share ``stream_trigger_share`` of the
non-target ones carries the trigger, the suspect is the most common predicted label of the flagged inputs; the model
is flagged when at least ``verdict_min_flags`` are flagged and the suspect holds ``verdict_share`` of them. An
attacked model's job also leaves :mod:`.localisation_maps` of its first ``maps`` triggered inputs (artifacts).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn

from ..attacks.triggers import load_trigger
from ..models.routing import trigger_positions
from ..naming import CLEAN
from ..runtime import derived_seed, to_input
from . import DefenseContext, DefenseResult
from .localisation_maps import first_maps
from .occlusion import POSITIONS, fill_images, occluded_probs, occlusion_masks

SCORES = ("drop", "drop_or_flip")
# one split, fill draw and stream for both rankings, so that the two defenses are compared on the same images
SEED_TAG = "patch_ablation"

# float images (B, 3, 32, 32) -> (logits (B, classes), a score per grid position (B, 64), higher = more suspect),
# from one forward pass of the model
Ranker = Callable[[nn.Module, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class AblationScores:
    """Per input: the score, the predicted label, the label with all suspects filled, the ranked suspects."""

    score: torch.Tensor  # (N,) float64
    predicted: torch.Tensor  # (N,) int64
    purified: torch.Tensor  # (N,) int64
    suspects: torch.Tensor  # (N, m) int64, best first


def ablation_scores(model: nn.Module, x: torch.Tensor, ranker: Ranker, fill: torch.Tensor, top_m: int,
                    batch_size: int = 500, device: torch.device | None = None, score: str = "drop", dilate: int = 0
                    ) -> AblationScores:
    """The patch-ablation score of each input of ``x`` (uint8 N x 32 x 32 x 3); ``fill`` from :func:`fill_images`
    (one per input, or one for all). ``batch_size`` counts the images of one forward pass, occlusions included."""
    if not 1 <= top_m <= POSITIONS:
        raise ValueError(f"top_m must lie in [1, {POSITIONS}], got {top_m}")
    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, got {score!r}")
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    per_chunk = max(1, batch_size // (top_m + 1))
    out: dict[str, list[torch.Tensor]] = {"score": [], "predicted": [], "purified": [], "suspects": []}
    try:
        for start in range(0, len(x), per_chunk):
            xb = to_input(x[start:start + per_chunk].to(device), channels_last=False)
            fb = (fill if len(fill) == 1 else fill[start:start + len(xb)]).to(device)
            logits, position_scores = ranker(model, xb)
            with torch.inference_mode():
                p0 = logits.float().softmax(dim=1)
                label = p0.argmax(dim=1)
                suspects = position_scores.topk(top_m, dim=1).indices
                p = occluded_probs(model, xb, occlusion_masks(suspects, dilate), fb)
                kept = p.gather(2, label.view(-1, 1, 1).expand(-1, top_m + 1, 1)).squeeze(2)
                # an occlusion that raises p0 is no drop (nor is float rounding between batch shapes)
                drop = (p0.gather(1, label[:, None]) - kept).amax(dim=1).clamp_min(0.0)
                flipped = (p.argmax(dim=2) != label[:, None]).any(dim=1)
                if score == "drop_or_flip":
                    drop = torch.where(flipped, torch.ones_like(drop), drop)
                out["score"].append(drop.double().cpu())
                out["predicted"].append(label.cpu())
                out["purified"].append(p[:, -1].argmax(dim=1).cpu())
                out["suspects"].append(suspects.cpu())
    finally:
        model.train(was_training)
    if not len(x):
        return AblationScores(torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.long),
                              torch.zeros(0, dtype=torch.long), torch.zeros(0, top_m, dtype=torch.long))
    return AblationScores(**{k: torch.cat(v) for k, v in out.items()})


def ablation_threshold(holdout_scores: torch.Tensor, frr: float) -> float:
    """The score above which an input is called triggered: the 1 - ``frr`` quantile (linear interpolation) of the
    held-out clean inputs' scores."""
    if not 0 < frr < 1:
        raise ValueError(f"frr must lie in (0, 1), got {frr}")
    if len(holdout_scores) < 2:
        raise ValueError("the threshold needs at least two held-out clean inputs")
    return float(torch.quantile(holdout_scores.double(), 1.0 - frr))


def model_verdict(flagged_labels: torch.Tensor, share: float, min_flags: int) -> dict[str, Any]:
    """From the predicted labels of the flagged inputs of a stream: the suspect (the most common; the smallest on a
    tie), its share, and whether the model is flagged (at least ``min_flags`` flags, suspect share >= ``share``)."""
    n = len(flagged_labels)
    if n == 0:
        return {"stream_flags": 0, "suspect": None, "suspect_share": None, "flagged": False}
    counts = torch.bincount(flagged_labels)
    suspect = int(counts.argmax())
    suspect_share = float(counts[suspect]) / n
    return {"stream_flags": n, "suspect": suspect, "suspect_share": suspect_share,
            "flagged": bool(n >= min_flags and suspect_share >= share)}


def stream_flags(clean_flags: torch.Tensor, clean_pred: torch.Tensor, trig_flags: torch.Tensor,
                 trig_pred: torch.Tensor, trig_source: torch.Tensor, share: float, seed: int
                 ) -> tuple[torch.Tensor, int]:
    """The predicted labels of the flagged inputs of a stream made of the clean test inputs, ``round(share * N)``
    of them (drawn among the non-target ones, seeded) replaced by their triggered copies; ``trig_source[i]`` is the
    clean test index triggered input i was made from. Returns the labels and the number of triggered inputs."""
    n_trig = min(int(round(share * len(clean_flags))), len(trig_source))
    chosen = torch.from_numpy(np.random.default_rng(seed).choice(len(trig_source), n_trig, replace=False))
    flags, pred = clean_flags.clone(), clean_pred.clone()
    flags[trig_source[chosen]], pred[trig_source[chosen]] = trig_flags[chosen], trig_pred[chosen]
    return pred[flags], n_trig


@dataclass(frozen=True)
class AblationConfig:
    top_m: int = 4
    fill: str = "clean_patch"
    frr: float = 0.01
    stream_trigger_share: float = 0.1
    verdict_share: float = 0.5
    verdict_min_flags: int = 5
    batch_size: int = 500
    score: str = "drop"
    dilate: int = 0

    @classmethod
    def from_block(cls, block: dict[str, Any]) -> "AblationConfig":
        return cls(int(block["top_m"]), block["fill"], float(block["frr"]), float(block["stream_trigger_share"]),
                   float(block["verdict_share"]), int(block["verdict_min_flags"]), int(block["batch_size"]),
                   block["score"], int(block["dilate"]))


@dataclass
class TriggeredInputs:
    """One trigger's inputs: the non-target clean test inputs with it, where they came from, and the grid
    positions its pixels overlap (None for a trigger that is not patch-located)."""

    x: torch.Tensor
    source: torch.Tensor  # index into the clean test inputs
    positions: list[int] | None


def _percent(hit: torch.Tensor) -> float:
    return 100.0 * float(hit.double().mean()) if len(hit) else float("nan")


def patch_ablation_defense(model: nn.Module, ranker: Ranker, holdout: torch.Tensor, clean_test: torch.Tensor,
                           y_test: torch.Tensor, triggered: dict[str, TriggeredInputs], target: int,
                           cfg: AblationConfig, seed: int, device: torch.device | None = None) -> dict[str, Any]:
    """The test on one model: threshold from ``holdout`` (also the fill pool), false rejections and purified BA on
    ``clean_test`` (labels ``y_test``), per trigger detection, localisation, ASR before and after purification and
    the stream verdict. The model is flagged when some trigger's stream flags it."""
    gen = torch.Generator().manual_seed(seed)
    pool = holdout

    def scores(x: torch.Tensor, exclude_self: bool = False) -> AblationScores:
        fill = fill_images(cfg.fill, pool, len(x), gen, exclude_self)
        return ablation_scores(model, x, ranker, fill, cfg.top_m, cfg.batch_size, device, cfg.score, cfg.dilate)

    s_hold, s_clean = scores(holdout, exclude_self=True), scores(clean_test)
    threshold = ablation_threshold(s_hold.score, cfg.frr)
    clean_flags = s_clean.score > threshold
    clean_after = torch.where(clean_flags, s_clean.purified, s_clean.predicted)
    per_trigger = {}
    for k, (name, trig) in enumerate(sorted(triggered.items())):
        s = scores(trig.x)
        flags = s.score > threshold
        after = torch.where(flags, s.purified, s.predicted)
        labels, n_trig = stream_flags(clean_flags, s_clean.predicted, flags, s.predicted, trig.source,
                                      cfg.stream_trigger_share, derived_seed(seed, f"stream-{k}"))
        verdict = model_verdict(labels, cfg.verdict_share, cfg.verdict_min_flags)
        per_trigger[name] = {
            "detection": float(flags.double().mean()) if len(flags) else float("nan"),
            "score_mean": float(s.score.mean()) if len(s.score) else float("nan"),
            # the top-ranked patch overlaps the trigger's pixels (patch-located triggers only)
            "localisation": None if trig.positions is None
            else float(torch.isin(s.suspects[:, 0], torch.tensor(trig.positions)).double().mean()),
            "asr": _percent(s.predicted == target), "purified_asr": _percent(after == target),
            "stream_triggered": n_trig, **verdict,
            "target_found": bool(verdict["flagged"] and verdict["suspect"] == target)}
    detection = max((r["detection"] for r in per_trigger.values()), default=0.0)
    flagged = any(r["flagged"] for r in per_trigger.values())
    return {"threshold": threshold, "holdout_score_mean": float(s_hold.score.mean()),
            "clean_score_mean": float(s_clean.score.mean()),
            "frr": float(clean_flags.double().mean()), "detection": detection,
            "localisation": max((r["localisation"] for r in per_trigger.values() if r["localisation"] is not None),
                                default=None),
            "forward_passes_per_input": 1 + cfg.top_m + 1,
            "ba": _percent(s_clean.predicted == y_test), "purified_ba": _percent(clean_after == y_test),
            "purified_asr": max((r["purified_asr"] for r in per_trigger.values()), default=float("nan")),
            "triggers": per_trigger, "flagged": flagged,
            "target_found": any(r["target_found"] for r in per_trigger.values())}


def run_patch_ablation(ctx: DefenseContext, name: str, ranker: Ranker, details: dict[str, Any]) -> DefenseResult:
    """A patch-ablation defense on the model as deployed, STRIP's split: the test set is shuffled (seeded), the
    first ``holdout`` images are the defender's held-out clean set (threshold and fill), the next ``test_images``
    measure the false rejections, and the non-target ones among them, with each of the run's triggers, detection."""
    block, job = ctx.config, ctx.job
    cfg = AblationConfig.from_block(block)
    held, tested = int(block["holdout"]), int(block["test_images"])
    if held + tested > len(job.y_test):
        raise ValueError(f"{name}.holdout + {name}.test_images = {held + tested} exceeds the {len(job.y_test)} "
                         "test images of the dataset")
    if not ctx.triggers:
        raise ValueError(f"{name}: no trigger file to make triggered inputs with")
    order = torch.from_numpy(np.random.default_rng(derived_seed(ctx.run.seed, f"{SEED_TAG}-split")).permutation(
        len(job.y_test)))
    holdout, test_idx = job.x_test[order[:held]], order[held:held + tested]
    clean_test, y_test = job.x_test[test_idx], job.y_test[test_idx]
    source = torch.nonzero(y_test != ctx.target).flatten()
    triggered = {}
    for trigger_name, path in ctx.triggers.items():
        trigger = load_trigger(path)
        positions = trigger_positions(trigger) if trigger.spec.patch_located else None
        triggered[trigger_name] = TriggeredInputs(trigger.apply(clean_test[source]), source, positions)
    result = patch_ablation_defense(ctx.model, ranker, holdout, clean_test, y_test, triggered, ctx.target, cfg,
                                    derived_seed(ctx.run.seed, SEED_TAG), job.device)
    print({k: result[k] for k in ("threshold", "frr", "detection", "localisation", "flagged")})
    summary, maps = {"applicable": True, "holdout": held, "test_images": tested, **details, **result}, {}
    if ctx.run.attack != CLEAN:
        # the triggered inputs' ASR left after purification: the table's "ASR after defense" column (%)
        summary["asr_after"] = result["purified_asr"]
        (name, trig), = triggered.items()  # an attacked model is examined with its own trigger only
        maps = first_maps(ctx.model, ranker, clean_test[source], trig.x, holdout, cfg.fill, int(block["maps"]),
                          derived_seed(ctx.run.seed, f"{SEED_TAG}-maps"), job.device) if block["maps"] else {}
    return DefenseResult(result["flagged"], result["target_found"], details=summary, artifacts=maps,
                         artifacts_metadata={"trigger": name, "positions": trig.positions} if maps else {})


def not_applicable(reason: str) -> DefenseResult:
    """The result of a defense on a model it cannot examine (the plan normally skips such a model)."""
    return DefenseResult(False, None, details={"applicable": False, "reason": reason})
