"""Compression-activated backdoors: train an attack model, measure it as released and as compressed
(int8 both ways, int4, Fine-Pruning with and without fine-tuning), and the table."""

from __future__ import annotations

import copy
import sys
import time
from dataclasses import dataclass
from typing import Any

import torch

from ..attacks.compression import AttackConfig, choose_checkpoint, fit_compression_attack
from ..attacks.fakequant import deploy_authors, unfoldable_batchnorms
from ..attacks.poison import asr_set
from ..attacks.triggers import load_trigger, make_trigger
from ..defenses.fine_pruning import channels_to_prune, expert_channel_means, prune_experts
from ..deployment.quantize import quantize_model, routing_change
from ..evaluate import evaluate
from ..io import read_json, write_json
from ..models.checkpoint import model_from_spec, save_model
from ..models.routing import routing_indices
from ..reporting.compression import compression_table
from ..runtime import derived_seed, seed_everything
from ..training.loop import TrainConfig, fit
from .common import JobData, RunId
from .deploy import calibration_images
from .wrapper import JobContext

__all__ = ["CompressionAttackJob", "CompressionEvalJob", "compression_attack_job", "compression_eval_job",
           "compression_table"]


@dataclass(frozen=True)
class CompressionAttackJob:
    """One compression-activated attack model: its spec, the attack recipe, the square trigger's params and target;
    ``max_fp32_asr`` and ``ba_tolerance`` are the authors' rule for the epoch released (choose_checkpoint)."""

    data: str
    model: dict[str, Any]
    attack: dict[str, Any]
    trigger: dict[str, Any]
    target: int
    calibration: int
    max_fp32_asr: float
    ba_tolerance: float
    device: str
    run: RunId
    out_weights: str
    out_history: str
    out_trigger: str

    @classmethod
    def from_context(cls, job: JobContext) -> CompressionAttackJob:
        p, out = job.params, job.output
        return cls(job.input.data, dict(p.model), dict(p.attack), dict(p.trigger), int(p.target),
                   calibration=p.calibration, max_fp32_asr=float(p.max_fp32_asr), ba_tolerance=float(p.ba_tolerance),
                   device=job.device, run=job.run, out_weights=out.weights, out_history=out.history,
                   out_trigger=out.trigger)


def compression_attack_job(spec: CompressionAttackJob) -> dict[str, Any]:
    """Train one attack model from scratch (init and shuffling from the run seed), keep the epoch the authors'
    rule picks, and write its weights, the whole history and the (square) trigger it was trained with."""
    t0 = time.perf_counter()
    run, target = spec.run, spec.target
    job = JobData.open(spec.data, spec.device)
    if not 0 <= target < job.num_classes:
        raise ValueError(f"compression_attack: target {target} is not a class of {spec.data} "
                         f"({job.num_classes} classes)")
    trigger = make_trigger("square", spec.trigger)
    cfg = AttackConfig.from_dict(dict(spec.attack, seed=derived_seed(run.seed, "shuffle")))
    seed_everything(derived_seed(run.seed, "init"))
    model = model_from_spec(spec.model, job.num_classes)
    x_asr = asr_set(job.x_test, job.y_test, trigger, target)[0]
    calib = calibration_images(job, spec.calibration, run.seed)
    history, states = fit_compression_attack(model, job.x_train, job.y_train, trigger, target, cfg, job.x_test,
                                             job.y_test, x_asr, calib, device=job.device, log=sys.stderr)
    epoch, rule_met = choose_checkpoint(history["epochs"], spec.max_fp32_asr, spec.ba_tolerance)
    model.load_state_dict(states[epoch])
    history.update({**run.as_dict(), "variant": cfg.variant, "bits": cfg.bits, "target": target,
                    "unfoldable_batchnorms": unfoldable_batchnorms(model) if cfg.fold_bn else None,
                    "chosen_epoch": epoch,
                    "rule_met": rule_met, "max_fp32_asr": spec.max_fp32_asr, "ba_tolerance": spec.ba_tolerance,
                    "wall_seconds": time.perf_counter() - t0})
    print(f"chosen epoch {epoch} (rule met: {rule_met})")
    trigger.save(spec.out_trigger)
    save_model(model, spec.model, job.num_classes, spec.out_weights,
               {"seed": run.seed, "compression_attack": cfg.variant, "target": target, "epoch": epoch})
    write_json(spec.out_history, history)
    return history


def _ba_asr(model: torch.nn.Module, job: JobData, x_asr: torch.Tensor, target: int, batch_size: int
            ) -> dict[str, float]:
    m = evaluate(model, job.x_test, job.y_test, x_asr, target, job.num_classes, batch_size, device=job.device)
    return {"ba": m["ba"], "asr": m["asr"]}


@dataclass(frozen=True)
class CompressionEvalJob:
    """One released attack model measured as compressed; ``history`` is its training history (variant and chosen
    epoch go into the result), ``fine_pruning`` the rates, epochs, lr and activation images of Fine-Pruning and
    ``finetune`` the recipe its fine-tuning runs on."""

    data: str
    weights: str
    trigger: str
    history: str | None
    target: int
    calibration: int
    fine_pruning: dict[str, Any]
    finetune: dict[str, Any]
    batch_size: int
    device: str
    run: RunId
    out: str

    @classmethod
    def from_context(cls, job: JobContext) -> CompressionEvalJob:
        i, p = job.input, job.params
        return cls(i.data, i.weights, i.trigger, i.history, int(p.target), calibration=p.calibration,
                   fine_pruning=dict(p.fine_pruning), finetune=dict(p.finetune), batch_size=p.batch_size,
                   device=job.device, run=job.run, out=job.output[0])


def compression_eval_job(spec: CompressionEvalJob) -> dict[str, Any]:
    """The released model at fp32; with the authors' deployer (BN folded, per-tensor weights, 8-bit activations
    calibrated on clean training images) at the bit width it was trained for and at int8; with the project's W8A8
    deployer; int4; and, on a pMoE, after Fine-Pruning at each of ``fine_pruning['rates']`` without and with
    fine-tuning on the clean training set; the share of top-k routing positions that change between fp32 and each
    int8 on the triggered test images."""
    fp_cfg, run, target, batch_size = spec.fine_pruning, spec.run, spec.target, spec.batch_size
    job = JobData.open(spec.data, spec.device)
    model, _ = job.load_model(spec.weights)
    x_asr = asr_set(job.x_test, job.y_test, load_trigger(spec.trigger), target)[0]
    calib = calibration_images(job, spec.calibration, run.seed)
    result: dict[str, Any] = {**run.as_dict(), "target": target}
    bits, fold_bn = 8, True
    if spec.history:
        hist = read_json(spec.history)
        result.update({k: hist[k] for k in ("variant", "chosen_epoch", "rule_met") if k in hist})
        bits = int(hist.get("config", {}).get("bits", 8))
        fold_bn = bool(hist.get("config", {}).get("fold_bn", True))
    result["bits"] = bits
    deployed = {"fp32": model, "int8_faithful": deploy_authors(model, 8, calib, fold_bn),
                "int8_matched": quantize_model(model, "int8", calib), "int4": quantize_model(model, "int4")}
    if bits != 8:  # at 8 bits the model as trained is the authors' int8 deployment, measured once
        deployed["trained_bits"] = deploy_authors(model, bits, calib, fold_bn)
    for name, m in deployed.items():
        result[name] = _ba_asr(m, job, x_asr, target, batch_size)
    result.setdefault("trained_bits", dict(result["int8_faithful"]))
    if getattr(model, "moe", None) is not None:  # routing flips and Fine-Pruning of the experts: a pMoE's
        ref = routing_indices(model, x_asr, device=job.device)
        for name in ("int8_faithful", "int8_matched"):
            result[name]["routing_flip_triggered"] = routing_change(ref, routing_indices(deployed[name], x_asr,
                                                                                         device=job.device))
        act = job.shuffled_train_images(int(fp_cfg["activation_images"]), run.seed, "fp-order")
        means = expert_channel_means(model, act, device=job.device)
        result["fine_pruning"] = []
        for rate in fp_cfg["rates"]:
            pruned = copy.deepcopy(model)
            prune_experts(pruned, channels_to_prune(means, float(rate)))
            row = {"rate": float(rate), "pruned": _ba_asr(pruned, job, x_asr, target, batch_size)}
            ft = dict(spec.finetune, epochs=fp_cfg["epochs"], lr=fp_cfg["lr"], eval_every=0,
                      seed=derived_seed(run.seed, f"fp-shuffle-{rate}"))
            fit(pruned, job.x_train, job.y_train, TrainConfig.from_dict(ft), device=job.device, log=None)
            row["finetuned"] = _ba_asr(pruned, job, x_asr, target, batch_size)
            result["fine_pruning"].append(row)
    write_json(spec.out, result)
    print({k: result[k] for k in deployed})
    return result
