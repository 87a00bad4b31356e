"""Defense stage: Fine-Pruning of a backdoored pMoE's experts (and pruning alone over a range of rates)."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..attacks import TRIGGERS
from ..attacks.poison import PoisonRecord, asr_set
from ..attacks.triggers import load_trigger
from ..defenses.fine_pruning import channels_to_prune, expert_channel_means, prune_experts, remove_masks
from ..evaluate import evaluate
from ..io import write_json
from ..models.checkpoint import save_model
from ..runtime import derived_seed
from ..training.loop import TrainConfig, fit
from .common import JobData, RunId
from .wrapper import JobContext

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


def pruning_inputs(job: JobData, trigger_path: str, poison_path: str, target: int, finetune_data: str,
                   activation_images: int, seed: int) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """What Fine-Pruning and the prune sweep read besides the model: the triggered non-target test images and
    :func:`fineprune_data`'s (fine-tuning images, labels, activation images); the trigger file is read once."""
    trigger = load_trigger(trigger_path)
    x_asr = asr_set(job.x_test, job.y_test, trigger, target)[0]
    return x_asr, fineprune_data(job.x_train, job.y_train, PoisonRecord.load(poison_path), trigger.kind,
                                 finetune_data, activation_images, seed)


@dataclass(frozen=True)
class FinePruneJob:
    """Fine-Pruning of one run's model at one pruning rate, fine-tuned on ``finetune_data`` (FINETUNE_DATA) with
    the fine_pruning config's epochs and lr over the ``train`` recipe."""

    data: str
    weights: str
    poison: str
    trigger: str
    out: str
    out_weights: str
    prune_rate: float
    finetune_data: str
    fine_pruning: dict[str, Any]
    train: dict[str, Any]
    target: int
    device: str
    run: RunId

    @classmethod
    def from_context(cls, job: JobContext) -> FinePruneJob:
        i, p, w = job.input, job.params, job.wildcards
        return cls(i.data, i.weights, i.poison, i.trigger, job.output.metrics, job.output.weights, float(w.prune),
                   w.variant, dict(p.fine_pruning), dict(p.train), target=p.target, device=job.device, run=job.run)


def fine_prune_job(spec: FinePruneJob) -> dict:
    """Prune the experts, fine-tune, and measure CA/ASR before, after pruning and after fine-tuning."""
    fp_cfg, run, target = spec.fine_pruning, spec.run, spec.target
    job = JobData.open(spec.data, spec.device)
    model, meta = job.load_model(spec.weights)
    x_asr, (x_ft, y_ft, x_act) = pruning_inputs(job, spec.trigger, spec.poison, target, spec.finetune_data,
                                                int(fp_cfg["activation_images"]), run.seed)

    def measure() -> dict[str, float]:
        m = evaluate(model, job.x_test, job.y_test, x_asr, target, job.num_classes, device=job.device)
        return {"ca": m["ba"], "asr": m["asr"]}

    result: dict[str, Any] = {**run.as_dict(), "prune_rate": spec.prune_rate, "finetune_data": spec.finetune_data,
                              "mask": bool(fp_cfg["mask"])}
    result["before"] = measure()
    pruned = channels_to_prune(expert_channel_means(model, x_act, device=job.device), spec.prune_rate)
    prune_experts(model, pruned, mask=result["mask"])
    result["pruned_channels"] = [p.tolist() for p in pruned]
    result["after_pruning"] = measure()
    ft = dict(spec.train, epochs=fp_cfg["epochs"], lr=fp_cfg["lr"], seed=derived_seed(run.seed, "fp-shuffle"),
              eval_every=0)
    history = fit(model, x_ft, y_ft, TrainConfig.from_dict(ft), job.x_test, job.y_test, device=job.device)
    remove_masks(model)
    result["after_finetuning"] = measure()
    result["finetune_history"] = history["epochs"]
    save_model(model, meta["model"], job.num_classes, spec.out_weights,
               {"seed": run.seed, "fine_pruned": spec.prune_rate})
    write_json(spec.out, result)
    print({k: result[k] for k in ("before", "after_pruning", "after_finetuning")})
    return result


@dataclass(frozen=True)
class PruneSweepJob:
    """Pruning alone at each of ``rates``, channels ranked on ``activation_images`` images of ``activation_data``
    (a FINETUNE_DATA choice, as Fine-Pruning's)."""

    data: str
    weights: str
    trigger: str
    poison: str
    out: str
    rates: list[float]
    activation_data: str
    activation_images: int
    target: int
    device: str
    run: RunId

    @classmethod
    def from_context(cls, job: JobContext) -> PruneSweepJob:
        i, p = job.input, job.params
        return cls(i.data, i.weights, i.trigger, i.poison, job.output[0], [float(r) for r in p.rates],
                   p.activation_data, p.activation_images, target=p.target, device=job.device, run=job.run)


def prune_sweep_job(spec: PruneSweepJob) -> list[dict]:
    """CA and ASR after pruning alone (no fine-tuning) at each rate in ``rates``."""
    run, target = spec.run, spec.target
    job = JobData.open(spec.data, spec.device)
    base, _ = job.load_model(spec.weights)
    x_asr, (_, _, x_act) = pruning_inputs(job, spec.trigger, spec.poison, target, spec.activation_data,
                                          spec.activation_images, run.seed)
    means = expert_channel_means(base, x_act, device=job.device)
    rows = []
    for rate in spec.rates:
        model = copy.deepcopy(base)
        prune_experts(model, channels_to_prune(means, rate))
        m = evaluate(model, job.x_test, job.y_test, x_asr, target, job.num_classes, device=job.device)
        rows.append({**run.as_dict(), "prune_rate": rate, "ca": m["ba"], "asr": m["asr"]})
    write_json(spec.out, rows)
    return rows
