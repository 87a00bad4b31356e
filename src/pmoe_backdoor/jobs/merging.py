"""Merging stage (issue 11): victims fine-tuned from one clean ancestor, the MSD strategy, the merged models (WAG
and the strategy's candidates), the suspect-class selection, and every model's BA and ASR on the test images that
were not held out for the defender."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..checkpoint import load_model, save_model
from ..evaluate import evaluate, predict_logits
from ..io import read_json, write_json
from ..merging import (
    EvolutionConfig,
    candidate_assignments,
    finetune_copy,
    holdout_split,
    load_strategy,
    merge_by_strategy,
    save_strategy,
    search_strategy,
    select_candidate,
    wag_merge,
)
from ..merging.report import merging_table, strategy_figure
from ..poison import asr_set
from ..runtime import derived_seed, seed_everything
from ..triggers import load_trigger
from .common import JobData
from .train import training_set

__all__ = ["finetune_victim_job", "merge_models_job", "merging_table", "select_candidate_job", "strategy_figure",
           "strategy_job"]


def finetune_victim_job(data_path: str, ancestor: str, poison_path: str, finetune_cfg: dict[str, Any], seed: int,
                        out_weights: str, out_history: str, device: str) -> dict[str, Any]:
    """A copy of the clean ancestor fine-tuned on the victim's training set (poisoned, or clean for 'benign')."""
    job = JobData.open(data_path, device)
    model, meta = job.load_model(ancestor)
    x_train, y_train = training_set(job, poison_path)
    seed_everything(derived_seed(seed, "finetune-init"))
    cfg = dict(finetune_cfg, seed=derived_seed(seed, "finetune-shuffle"))
    victim, history = finetune_copy(model, x_train, y_train, cfg, job.x_test, job.y_test, job.device, sys.stderr)
    history["seed"], history["ancestor"] = seed, str(ancestor)
    save_model(victim, meta["model"], job.num_classes, out_weights, {"seed": seed, "ancestor": str(ancestor)})
    write_json(out_history, history)
    return history


def strategy_job(num_models: int, coupled: bool, weights: dict[str, float], evolution: dict[str, Any],
                 out_json: str) -> None:
    """The MSD strategy for N models of the pmoe architecture (it depends on nothing else, so it is cached)."""
    strategy = search_strategy(num_models, coupled, weights, EvolutionConfig.from_dict(evolution))
    save_strategy(out_json, strategy)
    print(f"N={num_models} coupled={coupled}: fitness {strategy.fitness:.3f}, assignment {strategy.assignment}")


def merge_models_job(victims: list[str], strategy_json: str, roles: str, out_dir: str) -> dict[str, str]:
    """WAG and every candidate of the strategy (its role assignments), as model files in ``out_dir`` with a
    manifest ``merged.json`` naming them."""
    job_models = [load_model(path, "cpu") for path in victims]
    models = [m for m, _ in job_models]
    spec, num_classes = job_models[0][1]["model"], job_models[0][1]["num_classes"]
    out = Path(out_dir)
    files = {"WAG": "wag.safetensors"}
    save_model(wag_merge(models), spec, num_classes, out / files["WAG"], {"merge": "wag"})
    strategy = load_strategy(strategy_json)
    for name, assignment in candidate_assignments(strategy, len(models), roles):
        files[name] = f"{name}.safetensors"
        save_model(merge_by_strategy(models, assignment), spec, num_classes, out / files[name],
                   {"merge": "msd", "assignment": list(assignment)})
    write_json(out / "merged.json", {"victims": victims, "strategy": strategy.to_dict(), "files": files})
    return files


def select_candidate_job(data_path: str, victims: dict[str, str], triggers: dict[str, str], merged_dir: str,
                         holdout_per_class: int, holdout_seed: int, inversion: dict[str, Any], target: int,
                         batch_size: int, device: str, identity: dict[str, Any], out: str) -> dict[str, Any]:
    """The defender's choice among the candidates (from a clean set held out of the test set) and BA / ASR of the
    victims, WAG, every candidate and the chosen one on the remaining test images; ASR per victim trigger."""
    job = JobData.open(data_path, device)
    held, rest = holdout_split(job.dataset.y_test, holdout_per_class, holdout_seed)
    held_t, rest_t = torch.from_numpy(held), torch.from_numpy(rest)
    manifest = read_json(Path(merged_dir) / "merged.json")
    victim_models = {name: job.load_model(path)[0] for name, path in victims.items()}
    merged = {name: job.load_model(str(Path(merged_dir) / file))[0] for name, file in manifest["files"].items()}
    candidates = {name: model for name, model in merged.items() if name != "WAG"}
    selection = select_candidate(list(victim_models.values()), merged["WAG"], candidates, job.x_test[held_t],
                                 job.y_test[held_t], job.num_classes, inversion)
    x_eval, y_eval = job.x_test[rest_t], job.y_test[rest_t]
    asr_sets = {name: asr_set(x_eval, y_eval, load_trigger(path), target)[0] for name, path in triggers.items()}
    results = {}
    for name, model in {**victim_models, **merged}.items():
        base = evaluate(model, x_eval, y_eval, None, target, job.num_classes, batch_size, device=job.device)
        asr = {t: 100.0 * (predict_logits(model, x, job.device, batch_size).argmax(1) == target).float().mean().item()
               for t, x in asr_sets.items()}
        results[name] = {"ba": base["ba"], "asr": asr, "mean_asr": float(np.mean(list(asr.values())))}
    oracle = min(candidates, key=lambda n: results[n]["mean_asr"])
    chosen = selection["chosen"]
    record = {**identity, "victims": list(victims), "triggers": list(triggers), "held_out": len(held),
              "evaluated": len(rest), "selection": selection, "chosen": chosen, "oracle": oracle,
              "selected_is_oracle": results[chosen]["mean_asr"] <= results[oracle]["mean_asr"], "models": results}
    write_json(out, record)
    print({k: record[k] for k in ("chosen", "oracle")}, {n: round(r["mean_asr"], 1) for n, r in results.items()})
    return record
