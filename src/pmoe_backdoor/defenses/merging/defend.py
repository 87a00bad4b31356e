"""Defenses after merging: the merged model as deployed (fp32 / int8 / int4) and Fine-Pruning of the
merged model, each measured as clean accuracy (BA) and the ASR of every victim's trigger.

Fine-Pruning data: MSD's defender holds only a small clean set (the images per class held out of the test set for
the candidate selection) and no training data, so here both the ranking of the expert channels and the
fine-tuning use that held-out set, all of it; the reported metrics are on the rest of the test set, as for the
selection. The study's own Fine-Pruning (jobs/defense.py) fine-tunes on the training set instead, so the two are
not the same defense budget: with 50 images per class, ``fine_pruning.epochs`` epochs are only a few SGD steps
(recorded as ``finetune_steps``).

Fine-Pruning ranks and prunes the pMoE's expert channels, so it applies to merged pMoEs only: for a merging model
without prunable expert channels (PreAct-ResNet-18) the plan gives no prune rates and the merged models are only
deployed; :func:`fine_prune_merged` refuses such a model if it is given rates anyway.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence, TextIO

import numpy as np
import torch
import torch.nn as nn

from ...deployment.quantize import DEPLOY_PRECISIONS, quantize_model
from ...evaluate import evaluate, predict_logits
from ...models.architectures import PMoENet
from ...runtime import derived_seed
from ...training.loop import TrainConfig, fit
from ..fine_pruning import channels_to_prune, expert_channel_means, prune_experts, remove_masks

# the fine_pruning keys Fine-Pruning of a merged model reads (activation_images does not apply: the ranking uses
# the whole held-out set, which is all the defender has)
FP_KEYS = ("epochs", "lr", "mask")


@dataclass
class Scorer:
    """BA (%) on clean images and ASR (%) of each named triggered set (non-target images with that trigger)."""

    x: torch.Tensor
    y: torch.Tensor
    asr_sets: Mapping[str, torch.Tensor] = field(default_factory=dict)
    target: int = 0
    num_classes: int | None = None
    batch_size: int = 1000
    device: torch.device | None = None

    def __call__(self, model: nn.Module) -> dict[str, Any]:
        base = evaluate(model, self.x, self.y, None, self.target, self.num_classes, self.batch_size,
                        device=self.device)
        asr = {name: 100.0 * (predict_logits(model, x, self.device, self.batch_size).argmax(1) == self.target)
               .float().mean().item() for name, x in self.asr_sets.items()}
        # a set of benign victims only has no trigger: its ASR is undefined, not 0
        mean = float(np.mean(list(asr.values()))) if asr else float("nan")
        return {"ba": base["ba"], "asr": asr, "mean_asr": mean}


def check_defense_config(precisions: Sequence[str], prune_rates: Sequence[float], fp_cfg: Mapping[str, Any]) -> None:
    """Fail before any model is loaded when the deployment or Fine-Pruning settings cannot be run."""
    bad = [p for p in precisions if p not in DEPLOY_PRECISIONS]
    if bad:
        raise ValueError(f"deployment.precisions: {bad} not among {list(DEPLOY_PRECISIONS)}")
    if not prune_rates:
        return
    missing = [k for k in FP_KEYS if k not in fp_cfg]
    if missing:
        raise ValueError(f"fine_pruning: {missing} needed to Fine-Prune the merged models (prune rates "
                         f"{list(prune_rates)})")
    out_of_range = [r for r in prune_rates if not 0 <= float(r) < 100]
    if out_of_range:
        raise ValueError(f"fine_pruning.prune_rates: {out_of_range} outside [0, 100)")


def at_precisions(model: nn.Module, precisions: Sequence[str], calibration: torch.Tensor | None,
                  score: Scorer) -> dict[str, dict[str, Any]]:
    """The model as deployed at each precision (quantize.quantize_model; int8 calibrates on ``calibration``)."""
    return {p: score(quantize_model(model, p, calibration)) for p in precisions}


def fine_prune_merged(model: nn.Module, x_clean: torch.Tensor, y_clean: torch.Tensor, prune_rates: Sequence[float],
                      fp_cfg: Mapping[str, Any], train_cfg: Mapping[str, Any], seed: int, score: Scorer,
                      device: torch.device | None = None, log: TextIO | None | str = "stderr") -> list[dict]:
    """Fine-Pruning of ``model`` at each rate, each from a fresh copy: rank every expert's channels on the clean
    images (fineprune.expert_channel_means), zero the lowest ``rate`` % (masked if ``fp_cfg['mask']``), fine-tune on
    the same clean images with ``train_cfg`` at ``fp_cfg``'s epochs and lr; scored after pruning and after
    fine-tuning. ``model`` is left untouched."""
    check_defense_config([], prune_rates, fp_cfg)
    if not prune_rates:
        return []
    if not isinstance(model, PMoENet):
        raise ValueError(f"fine_pruning.prune_rates {list(prune_rates)}: Fine-Pruning of merged models ranks expert "
                         f"channels, which a {type(model).__name__} does not have (merging.model must be a pmoe "
                         "model to Fine-Prune its merged models)")
    means = expert_channel_means(model, x_clean, device=device)  # the ranking does not depend on the rate
    cfg = TrainConfig.from_dict(dict(train_cfg, epochs=fp_cfg["epochs"], lr=fp_cfg["lr"], eval_every=0,
                                     seed=derived_seed(seed, "merged-fp-shuffle")))
    rows = []
    for rate in prune_rates:
        pruned_model = copy.deepcopy(model)
        pruned = channels_to_prune(means, float(rate))
        prune_experts(pruned_model, pruned, mask=bool(fp_cfg["mask"]))
        row: dict[str, Any] = {"prune_rate": float(rate), "pruned_channels": [p.tolist() for p in pruned],
                               "after_pruning": score(pruned_model)}
        history = fit(pruned_model, x_clean, y_clean, cfg, device=device, log=log)
        remove_masks(pruned_model)
        row["after_finetuning"] = score(pruned_model)
        row["finetune_batch_size"] = cfg.batch_size
        row["finetune_steps"] = cfg.epochs * -(-len(y_clean) // cfg.batch_size)
        row["finetune_loss"] = [e["train_loss"] for e in history["epochs"]]
        rows.append(row)
    return rows
