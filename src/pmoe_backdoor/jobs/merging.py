"""Merging stage: victims fine-tuned from one clean ancestor, the MSD strategy, the merged models (WAG
and the strategy's candidates), the suspect-class selection, and every model's BA and ASR on the test images that
were not held out for the defender."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..attacks.poison import asr_set
from ..attacks.triggers import load_trigger
from ..defenses.merging import (
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
from ..defenses.merging.defend import Scorer, at_precisions, check_defense_config, fine_prune_merged
from ..defenses.merging.report import merged_defense_table, merging_table, strategy_figure
from ..io import read_json, write_json
from ..models import model_kind
from ..models.checkpoint import load_model, save_model
from ..runtime import derived_seed, seed_everything
from .common import JobData
from .deploy import calibration_images
from .train import training_set
from .wrapper import JobContext

__all__ = ["DefendMergedJob", "SelectCandidateJob", "defend_merged_job", "finetune_victim_job", "merge_models_job",
           "merged_defense_table", "merging_table", "select_candidate_job", "strategy_figure",
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
                 out_json: str, architecture: str = "pmoe") -> None:
    """The MSD strategy for N models of one architecture (it depends on nothing else, so it is cached)."""
    strategy = search_strategy(num_models, coupled, weights, EvolutionConfig.from_dict(evolution), architecture)
    save_strategy(out_json, strategy)
    print(f"{architecture} N={num_models} coupled={coupled}: fitness {strategy.fitness:.3f}, "
          f"assignment {strategy.assignment}")


def merge_models_job(victims: list[str], strategy_json: str, roles: str, out_dir: str) -> dict[str, str]:
    """WAG and every candidate of the strategy (its role assignments), as model files in ``out_dir`` with a
    manifest ``merged.json`` naming them."""
    job_models = [load_model(path, "cpu") for path in victims]
    models = [m for m, _ in job_models]
    spec, num_classes = job_models[0][1]["model"], job_models[0][1]["num_classes"]
    strategy = load_strategy(strategy_json)
    if strategy.architecture != spec.get("arch"):
        raise ValueError(f"{strategy_json} is a strategy for the {strategy.architecture} architecture, the victims "
                         f"are {spec.get('arch')}")
    out = Path(out_dir)
    files = {"WAG": "wag.safetensors"}
    save_model(wag_merge(models), spec, num_classes, out / files["WAG"], {"merge": "wag"})
    for name, assignment in candidate_assignments(strategy, len(models), roles):
        files[name] = f"{name}.safetensors"
        save_model(merge_by_strategy(models, assignment), spec, num_classes, out / files[name],
                   {"merge": "msd", "assignment": list(assignment)})
    write_json(out / "merged.json", {"victims": victims, "strategy": strategy.to_dict(), "files": files})
    return files


@dataclass(frozen=True)
class MergedSetJob:
    """What every job on one merged set reads: the data, each victim trigger (label -> file), the folder
    merge_models wrote, the defender's held-out split (``holdout_per_class`` test images per class, drawn from
    ``holdout_seed``), how ASR and BA are measured, and which set the result belongs to (``identity``)."""

    data: str
    triggers: dict[str, str]
    merged: str
    holdout_per_class: int
    holdout_seed: int
    target: int
    batch_size: int
    device: str
    identity: dict[str, Any]
    out: str

    @staticmethod
    def common(job: JobContext) -> dict[str, Any]:
        """The shared fields from a workflow script's job context."""
        w, p = job.wildcards, job.params
        return {"data": job.input.data, "triggers": dict(p.triggers), "merged": job.input.merged,
                "holdout_per_class": p.holdout_per_class, "holdout_seed": p.holdout_seed, "target": p.target,
                "batch_size": p.batch_size, "device": job.device, "out": job.output[0],
                "identity": {"dataset": w.dataset, "model": w.model, "set": w.set, "seed": int(w.seed),
                             "coupling": w.coupling}}


@dataclass(frozen=True)
class SelectCandidateJob(MergedSetJob):
    """The candidates of one set scored against its victims (label -> weights); ``inversion`` configures the
    suspect-class search."""

    victims: dict[str, str]
    inversion: dict[str, Any]

    @classmethod
    def from_context(cls, job: JobContext) -> SelectCandidateJob:
        p = job.params
        return cls(**cls.common(job), victims=dict(zip(p.labels, job.input.victims)), inversion=dict(p.inversion))


def select_candidate_job(spec: SelectCandidateJob) -> dict[str, Any]:
    """The defender's choice among the candidates (from a clean set held out of the test set) and BA / ASR of the
    victims, WAG, every candidate and the chosen one on the remaining test images; ASR per victim trigger."""
    victims, triggers, merged_dir = spec.victims, spec.triggers, spec.merged
    job = JobData.open(spec.data, spec.device)
    held, rest = holdout_split(job.dataset.y_test, spec.holdout_per_class, spec.holdout_seed)
    held_t, rest_t = torch.from_numpy(held), torch.from_numpy(rest)
    manifest = read_json(Path(merged_dir) / "merged.json")
    victim_models = {name: job.load_model(path)[0] for name, path in victims.items()}
    merged = {name: job.load_model(str(Path(merged_dir) / file))[0] for name, file in manifest["files"].items()}
    candidates = {name: model for name, model in merged.items() if name != "WAG"}
    selection = select_candidate(list(victim_models.values()), merged["WAG"], candidates, job.x_test[held_t],
                                 job.y_test[held_t], job.num_classes, spec.inversion)
    score = _reported_split_scorer(job, rest_t, triggers, spec.target, spec.batch_size)
    results = {name: score(model) for name, model in {**victim_models, **merged}.items()}
    oracle = min(candidates, key=lambda n: results[n]["mean_asr"])
    chosen = selection["chosen"]
    record = {**spec.identity, "victims": list(victims), "triggers": list(triggers), "held_out": len(held),
              "evaluated": len(rest), "selection": selection, "chosen": chosen, "oracle": oracle,
              "selected_is_oracle": results[chosen]["mean_asr"] <= results[oracle]["mean_asr"], "models": results}
    write_json(spec.out, record)
    print({k: record[k] for k in ("chosen", "oracle")}, {n: round(r["mean_asr"], 1) for n, r in results.items()})
    return record


def _reported_split_scorer(job: JobData, rest: torch.Tensor, triggers: dict[str, str], target: int,
                           batch_size: int) -> Scorer:
    """BA and per-trigger ASR on the test images not held out (the split every merging result is reported on)."""
    x_eval, y_eval = job.x_test[rest], job.y_test[rest]
    asr_sets = {name: asr_set(x_eval, y_eval, load_trigger(path), target)[0] for name, path in triggers.items()}
    return Scorer(x_eval, y_eval, asr_sets, target, job.num_classes, batch_size, job.device)


@dataclass(frozen=True)
class DefendMergedJob(MergedSetJob):
    """WAG and select_candidate's choice (``selection``) among the merged models of one set, deployed at each of
    ``precisions`` and Fine-Pruned at each of ``prune_rates`` (``fine_pruning``: epochs, lr, mask; over the
    ``train`` recipe); the held-out split must be select_candidate's."""

    selection: str
    precisions: list[str]
    calibration: int
    prune_rates: list[float]
    fine_pruning: dict[str, Any]
    train: dict[str, Any]

    @classmethod
    def from_context(cls, job: JobContext) -> DefendMergedJob:
        p = job.params
        return cls(**cls.common(job), selection=job.input.selection, precisions=list(p.precisions),
                   calibration=p.calibration, prune_rates=list(p.prune_rates), fine_pruning=dict(p.fine_pruning),
                   train=dict(p.train))


def defend_merged_job(spec: DefendMergedJob) -> dict[str, Any]:
    """The WAG model and the selected MSD candidate of one set (select_candidate's choice) at each deployment
    precision (int8 calibrated on ``calibration`` clean training images, seeded by the run seed, as deploy_eval
    does) and after Fine-Pruning at each of ``prune_rates``; BA and ASR per victim trigger on the same test images
    as select_candidate (its held-out clean set excluded).

    Fine-Pruning uses only the defender's held-out clean set (``holdout_per_class`` test images per class): it
    ranks the expert channels and is the fine-tuning set (merging.defend explains why). A model without expert
    channels (PreAct-ResNet-18) gets no prune rates from the plan; the record says so (``fine_pruning.skipped``)."""
    triggers, merged_dir, selection_path, fp_cfg = spec.triggers, spec.merged, spec.selection, spec.fine_pruning
    precisions, calibration, prune_rates = spec.precisions, spec.calibration, spec.prune_rates
    selection, manifest = read_json(selection_path), read_json(Path(merged_dir) / "merged.json")
    chosen, files = selection.get("chosen"), manifest.get("files", {})
    if "WAG" not in files or chosen not in files:
        raise ValueError(f"{merged_dir}/merged.json lists {sorted(files)}: expected 'WAG' and the chosen candidate "
                         f"{chosen!r} of {selection_path}")
    if sorted(triggers) != sorted(selection.get("triggers", [])):
        raise ValueError(f"triggers {sorted(triggers)} differ from those of {selection_path}: "
                         f"{sorted(selection.get('triggers', []))}")
    check_defense_config(precisions, prune_rates, fp_cfg)
    job = JobData.open(spec.data, spec.device)
    held, rest = holdout_split(job.dataset.y_test, spec.holdout_per_class, spec.holdout_seed)
    if (len(held), len(rest)) != (selection.get("held_out"), selection.get("evaluated")):
        raise ValueError(f"merging.holdout_per_class / holdout_seed give {len(held)} held-out and {len(rest)} "
                         f"evaluated images, {selection_path} has {selection.get('held_out')} and "
                         f"{selection.get('evaluated')}: the split must be select_candidate's")
    held_t = torch.from_numpy(held)
    x_clean, y_clean = job.x_test[held_t], job.y_test[held_t]
    score = _reported_split_scorer(job, torch.from_numpy(rest), triggers, spec.target, spec.batch_size)
    calib = calibration_images(job, calibration, spec.identity["seed"]) if "int8" in precisions else None
    fp_record = {k: fp_cfg[k] for k in ("epochs", "lr", "mask") if k in fp_cfg}
    record: dict[str, Any] = {
        **spec.identity, "chosen": chosen, "triggers": list(triggers), "held_out": len(held), "evaluated": len(rest),
        "precisions": list(precisions), "calibration_images": calibration if "int8" in precisions else 0,
        "prune_rates": [float(r) for r in prune_rates],
        "fine_pruning": {**fp_record, "data": "held-out clean test images", "images": len(held)}, "models": {}}
    for method, name in (("WAG", "WAG"), ("MSD (selected)", chosen)):
        model, meta = job.load_model(str(Path(merged_dir) / files[name]))
        arch = meta["model"]["arch"]
        if not prune_rates and not model_kind(arch).prunable_channels:
            record["fine_pruning"]["skipped"] = (f"the merged {arch} models have no expert channels to prune "
                                                 "(fine_pruning applies to merging.model of arch pmoe)")
        record["models"][method] = {
            "name": name, "precisions": at_precisions(model, precisions, calib, score),
            "fine_pruning": fine_prune_merged(model, x_clean, y_clean, prune_rates, fp_cfg, spec.train,
                                              spec.identity["seed"], score, job.device)}
    write_json(spec.out, record)
    if "skipped" in record["fine_pruning"]:
        print(f"Fine-Pruning skipped: {record['fine_pruning']['skipped']}")
    print({m: {p: (round(r["ba"], 1), round(r["mean_asr"], 1)) for p, r in v["precisions"].items()}
           for m, v in record["models"].items()})
    return record
