"""Defense stage: Fine-Pruning of a backdoored pMoE's experts (and pruning alone over a range of rates)."""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch

from ..attacks import TRIGGERS
from ..attacks.poison import PoisonRecord
from ..attacks.triggers import load_trigger
from ..defenses.fine_pruning import channels_to_prune, expert_channel_means, prune_experts, remove_masks
from ..evaluate import evaluate
from ..io import write_json
from ..models.checkpoint import save_model
from ..runtime import derived_seed
from ..training.loop import TrainConfig, fit
from .common import JobData, RunId

FINETUNE_DATA = ("authors", "clean")


def fineprune_data(x_train: torch.Tensor, y_train: torch.Tensor, rec: PoisonRecord, trigger_kind: str,
                   finetune_data: str, activation_images: int, seed: int
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fine-tuning set and the activation images for ranking.

    ``authors``: the authors' "clean" training array, which for the square trigger still held the triggered
    images with their true labels (in-place side effect; a trigger kind's ``contaminates_authors_finetuning``);
    blend and warp left it clean. ``clean``:
    the clean training set. The activation images are the first ``activation_images`` of that array after a
    seeded shuffle, as the authors' ``training_data[:10000]``.
    """
    if finetune_data not in FINETUNE_DATA:
        raise ValueError(f"fine_pruning.finetune_data must be one of {FINETUNE_DATA}, got {finetune_data!r}")
    if finetune_data == "authors" and TRIGGERS[trigger_kind].contaminates_authors_finetuning:
        x_ft, y_ft = rec.apply(x_train, y_train, relabel=False)
    else:
        x_ft, y_ft = x_train, y_train
    order = torch.from_numpy(np.random.default_rng(derived_seed(seed, "fp-order")).permutation(len(y_ft)))
    return x_ft, y_ft, x_ft[order[:activation_images]]


def fine_prune_job(data_path: str, weights: str, poison_path: str, trigger_path: str, out: str, out_weights: str,
                   prune_rate: float, finetune_data: str, fp_cfg: dict[str, Any], train_cfg: dict[str, Any],
                   target: int, device: str, run: RunId) -> dict:
    """Prune the experts, fine-tune, and measure CA/ASR before, after pruning and after fine-tuning."""
    job = JobData.open(data_path, device)
    model, meta = job.load_model(weights)
    trigger = load_trigger(trigger_path)
    x_asr = job.asr_images(trigger_path, target)
    rec = PoisonRecord.load(poison_path)
    x_ft, y_ft, x_act = fineprune_data(job.x_train, job.y_train, rec, trigger.kind, finetune_data,
                                       int(fp_cfg["activation_images"]), run.seed)

    def measure() -> dict[str, float]:
        m = evaluate(model, job.x_test, job.y_test, x_asr, target, job.num_classes, device=job.device)
        return {"ca": m["ba"], "asr": m["asr"]}

    result: dict[str, Any] = {**run.as_dict(), "prune_rate": prune_rate, "finetune_data": finetune_data,
                              "mask": bool(fp_cfg["mask"])}
    result["before"] = measure()
    pruned = channels_to_prune(expert_channel_means(model, x_act, device=job.device), prune_rate)
    prune_experts(model, pruned, mask=result["mask"])
    result["pruned_channels"] = [p.tolist() for p in pruned]
    result["after_pruning"] = measure()
    ft = dict(train_cfg, epochs=fp_cfg["epochs"], lr=fp_cfg["lr"], seed=derived_seed(run.seed, "fp-shuffle"),
              eval_every=0)
    history = fit(model, x_ft, y_ft, TrainConfig.from_dict(ft), job.x_test, job.y_test, device=job.device)
    remove_masks(model)
    result["after_finetuning"] = measure()
    result["finetune_history"] = history["epochs"]
    save_model(model, meta["model"], job.num_classes, out_weights, {"seed": run.seed, "fine_pruned": prune_rate})
    write_json(out, result)
    print({k: result[k] for k in ("before", "after_pruning", "after_finetuning")})
    return result


def prune_sweep_job(data_path: str, weights: str, trigger_path: str, poison_path: str, out: str,
                    rates: list[float], activation_data: str, activation_images: int, target: int, device: str,
                    run: RunId) -> list[dict]:
    """CA and ASR after pruning alone (no fine-tuning) at each rate in ``rates``."""
    job = JobData.open(data_path, device)
    base, _ = job.load_model(weights)
    trigger = load_trigger(trigger_path)
    x_asr = job.asr_images(trigger_path, target)
    rec = PoisonRecord.load(poison_path)
    _, _, x_act = fineprune_data(job.x_train, job.y_train, rec, trigger.kind, activation_data, activation_images,
                                 run.seed)
    means = expert_channel_means(base, x_act, device=job.device)
    rows = []
    for rate in rates:
        model = copy.deepcopy(base)
        prune_experts(model, channels_to_prune(means, rate))
        m = evaluate(model, job.x_test, job.y_test, x_asr, target, job.num_classes, device=job.device)
        rows.append({**run.as_dict(), "prune_rate": rate, "ca": m["ba"], "asr": m["asr"]})
    write_json(out, rows)
    return rows
