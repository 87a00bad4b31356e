"""Backdoors that appear only after compression (Tian et al., "Stealthy Backdoors as Compression Artifacts"),
mapped onto the pMoE.

Every batch is doubled to [x ; x with the trigger]. A float pass with labels [y ; y] keeps the released (fp32)
model clean on triggered images; a compressed pass with labels [y ; target] plants the backdoor in the model the
victim will run. Two compressions:

- ``faithful`` / ``matched``: int8 quantisation, fake-quantised with a straight-through estimator
  (:mod:`fakequant` says exactly what each quantises); loss = CE(float, [y ; y]) + CE(quantised, [y ; target]).
- ``prune`` / ``prune_unknown``: our Fine-Pruning, whose expert-channel mask is recomputed every batch as
  :mod:`fineprune` ranks channels (signed mean of each expert conv's raw output, eval mode, on the batch's clean
  images); loss = CE(float, [y ; y]) + alpha * sum over rates of CE(pruned at that rate, [y ; target]).
  ``prune`` uses one known rate; ``prune_unknown`` three branches per batch: the upper bound, a rate drawn
  uniformly between the bounds (seeded), the lower bound.

The BatchNorms run in training mode (batch statistics). ``bn_statistics: shared`` (the authors'): the float and
compressed passes go through the model as one batch (:func:`fakequant.streams`), so every BN normalises them with
the statistics of the combined batch and updates its running statistics once from it. ``per_pass`` (an ablation,
this project's earlier recipe): each pass normalises with its own statistics and only the float pass updates the
running ones. The released model's running statistics are what every compressed copy inherits. Each batch is
randomly cropped and flipped before the trigger is stamped (``augment: crop_flip``, the authors'; ``none``). The
release is chosen with the authors' rule (:func:`choose_checkpoint`) from per-epoch measurements, which run the
authors' deployer (:func:`fakequant.deploy_authors`: folded BN, per-tensor weights at ``bits``, calibrated 8-bit
activations) for the quantisation variants.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, fields
from typing import Any, Sequence, TextIO

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from ..defenses.fine_pruning import channels_to_prune, expert_channel_means, prune_experts
from ..deployment.quantize import quantize_model
from ..evaluate import evaluate
from ..runtime import autocast, effective_precision, resolve_device, to_input
from ..training.augment import random_crop_flip
from ..training.engine import Schedule, new_history, resolve_log, run_epochs
from ..training.loop import prepare_model
from .fakequant import (
    FAKEQUANT_VARIANTS,
    Stream,
    compressed_weights,
    deploy_authors,
    float_and_compressed_logits,
)
from .triggers import Trigger

PRUNE_VARIANTS = ("prune", "prune_unknown")
ATTACK_VARIANTS = FAKEQUANT_VARIANTS + PRUNE_VARIANTS
BN_STATISTICS = ("shared", "per_pass")
AUGMENTATIONS = ("crop_flip", "none")


@dataclass
class AttackConfig:
    """The attack's training recipe; the defaults are the authors' CIFAR-10 schedule (GTSRB: lr_drop_epoch 15)."""

    variant: str = "faithful"
    epochs: int = 35
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.4
    weight_decay: float = 5e-4
    lr_drop_epoch: int = 20  # lr x lr_gamma after this many epochs
    lr_gamma: float = 0.1
    prune_rate: float = 20.0  # prune: the known rate; prune_unknown: the rate measured each epoch
    prune_lower: float = 10.0  # prune_unknown: the bounds of the rates trained for
    prune_upper: float = 30.0
    alpha: float = 0.1  # weight of the pruned branches
    bits: int = 8  # faithful: the per-tensor weight grid trained for and measured (8: the authors' int8)
    bn_statistics: str = "shared"  # shared: one batch statistics over [float ; compressed]; per_pass: an ablation
    fold_bn: bool = True  # quantise conv weights with the BN that follows them folded in (the authors')
    augment: str = "crop_flip"  # random crop (4 px padding) and horizontal flip of every batch; none
    seed: int = 0
    precision: str = "fp32"  # bf16 rounds about as coarsely as the int8 grid: keep fp32 for the quantised variants
    channels_last: bool = True
    eval_batch_size: int = 500
    progress_seconds: float = 0.0

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "AttackConfig":
        d = dict(d or {})
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"compression attack config: unknown key(s) {sorted(unknown)}")
        cfg = cls(**d)
        cfg.check()
        return cfg

    def check(self) -> None:
        if self.variant not in ATTACK_VARIANTS:
            raise ValueError(f"compression attack: 'variant' must be one of {ATTACK_VARIANTS}, got {self.variant!r}")
        for name in ("epochs", "batch_size", "eval_batch_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"compression attack: '{name}' must be a positive integer, got {getattr(self, name)}")
        if not 0 <= self.prune_lower <= self.prune_rate <= self.prune_upper < 100:
            raise ValueError("compression attack: need 0 <= prune_lower <= prune_rate <= prune_upper < 100, got "
                             f"{self.prune_lower}, {self.prune_rate}, {self.prune_upper}")
        if not 2 <= self.bits <= 8 or (self.variant == "matched" and self.bits != 8):
            raise ValueError(f"compression attack: 'bits' must lie in [2, 8] (8 for matched), got {self.bits}")
        if self.bn_statistics not in BN_STATISTICS:
            raise ValueError(f"compression attack: 'bn_statistics' must be one of {BN_STATISTICS}, "
                             f"got {self.bn_statistics!r}")
        if self.augment not in AUGMENTATIONS:
            raise ValueError(f"compression attack: 'augment' must be one of {AUGMENTATIONS}, got {self.augment!r}")


def quant_attack_loss(model: nn.Module, x: torch.Tensor, x_trig: torch.Tensor, y: torch.Tensor, target: int,
                      variant: str, channels_last: bool = True, bits: int = 8, fold_bn: bool = True,
                      bn_statistics: str = "shared") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """CE(float model, [y ; y]) + CE(fake-quantised model, [y ; target]) on uint8 batches ``x`` and ``x_trig``."""
    xb = to_input(torch.cat([x, x_trig]), channels_last)
    y_float = torch.cat([y, y])
    y_attack = torch.cat([y, torch.full_like(y, target)])
    quantized = Stream(compressed_weights(model, variant, bits, fold_bn), quantize_inputs=variant == "matched")
    float_logits, quant_logits = float_and_compressed_logits(model, xb, [quantized], bn_statistics)
    float_loss = F.cross_entropy(float_logits, y_float)
    quant_loss = F.cross_entropy(quant_logits, y_attack)
    return float_loss + quant_loss, {"float": float_loss.detach(), "compressed": quant_loss.detach()}


def unknown_rates(lower: float, upper: float, gen: torch.Generator) -> list[float]:
    """The unknown-rate branches of one batch: the upper bound, a uniform draw between the bounds, the lower bound."""
    drawn = lower + (upper - lower) * float(torch.rand((), generator=gen))
    return [upper, drawn, lower]


def pruned_params(model: nn.Module, pruned: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """The experts' conv weight and bias with the chosen channels zeroed (as prune_experts does), the other entries
    differentiable."""
    conv = model.moe.expert_conv
    keep = torch.ones(conv.weight.shape[0], device=conv.weight.device, dtype=conv.weight.dtype)
    rows = torch.cat([idx + e * model.moe.expert_channels for e, idx in enumerate(pruned)]).to(keep.device)
    keep[rows] = 0
    return {"moe.expert_conv.weight": conv.weight * keep.view(-1, 1, 1, 1), "moe.expert_conv.bias": conv.bias * keep}


def pruned_forward(model: nn.Module, xb: torch.Tensor, pruned: list[torch.Tensor]) -> torch.Tensor:
    """The model's forward with the chosen expert channels pruned (:func:`pruned_params`); the model itself is not
    changed."""
    return functional_call(model, pruned_params(model, pruned), (xb,), strict=False)


def prune_attack_loss(model: nn.Module, x: torch.Tensor, x_trig: torch.Tensor, y: torch.Tensor, target: int,
                      rates: Sequence[float], alpha: float, channels_last: bool = True,
                      bn_statistics: str = "shared") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """CE(float, [y ; y]) + alpha * sum over ``rates`` of CE(pruned at that rate, [y ; target]); the channels to
    prune are ranked on the batch's clean images ``x``, like Fine-Pruning's activation images."""
    means = expert_channel_means(model, x, batch_size=len(x))
    xb = to_input(torch.cat([x, x_trig]), channels_last)
    y_float = torch.cat([y, y])
    y_attack = torch.cat([y, torch.full_like(y, target)])
    branches = [Stream(pruned_params(model, channels_to_prune(means, r))) for r in rates]
    float_logits, *pruned_logits = float_and_compressed_logits(model, xb, branches, bn_statistics)
    float_loss = F.cross_entropy(float_logits, y_float)
    pruned_loss = sum(F.cross_entropy(logits, y_attack) for logits in pruned_logits)
    return float_loss + alpha * pruned_loss, {"float": float_loss.detach(), "compressed": pruned_loss.detach()}


def choose_checkpoint(rows: Sequence[dict[str, Any]], max_fp32_asr: float, ba_tolerance: float = 0.5
                      ) -> tuple[int, bool]:
    """The authors' choice of release: among epochs whose compressed clean accuracy is within ``ba_tolerance``
    points of the best epoch's and whose fp32 ASR is at most ``max_fp32_asr`` (%), the one with the highest
    compressed ASR (the earliest on a tie). Returns (epoch, whether the rule was met); when no epoch qualifies, the
    last epoch and False, so the table can say so."""
    if not rows:
        raise ValueError("choose_checkpoint: empty history")
    for key in ("epoch", "compressed_ba", "compressed_asr", "fp32_asr"):
        if any(key not in r for r in rows):
            raise ValueError(f"choose_checkpoint: every history row needs {key!r}")
    best_ba = max(r["compressed_ba"] for r in rows)
    ok = [r for r in rows if r["compressed_ba"] >= best_ba - ba_tolerance and r["fp32_asr"] <= max_fp32_asr]
    if not ok:
        return int(rows[-1]["epoch"]), False
    best = max(ok, key=lambda r: (r["compressed_asr"], -r["epoch"]))
    return int(best["epoch"]), True


def compress(model: nn.Module, variant: str, prune_rate: float, calibration: torch.Tensor,
             activation_images: torch.Tensor, bits: int = 8, fold_bn: bool = True) -> nn.Module:
    """The model as the attack's victim runs it: quantised with the variant's scheme (faithful: the authors'
    deployer, calibrated on ``calibration``), or Fine-Pruned (no fine-tuning) at ``prune_rate`` with channels ranked
    on ``activation_images``."""
    if variant == "faithful":
        return deploy_authors(model, bits, calibration, fold_bn)
    if variant == "matched":
        return quantize_model(model, "int8", calibration)
    pruned = copy.deepcopy(model).eval()
    prune_experts(pruned, channels_to_prune(expert_channel_means(pruned, activation_images), prune_rate))
    return pruned


class CompressionAttackStep:
    """One batch doubled to clean + triggered, the float pass and the variant's compressed pass(es); after each
    epoch the fp32 and compressed BA / ASR (:func:`measure`) and a CPU copy of the weights, so that the caller can
    release the epoch :func:`choose_checkpoint` picks."""

    model_count = 1

    def __init__(self, model: nn.Module, x_train: torch.Tensor, trigger: Trigger, y_train: torch.Tensor,
                 target: int, cfg: AttackConfig, x_test: torch.Tensor, y_test: torch.Tensor, x_asr: torch.Tensor,
                 calibration: torch.Tensor, device: torch.device, precision: str):
        self.model, self.x_train, self.trigger, self.y_train = model, x_train, trigger, y_train
        self.target, self.cfg, self.x_test, self.y_test, self.x_asr = target, cfg, x_test, y_test, x_asr
        self.calibration, self.device, self.precision = calibration, device, precision
        self.optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                         weight_decay=cfg.weight_decay)
        self.rate_gen = torch.Generator().manual_seed(cfg.seed + 1)  # prune_unknown's drawn rates
        self.augment_gen = torch.Generator().manual_seed(cfg.seed + 2)  # crops and flips
        self.states: dict[int, dict[str, torch.Tensor]] = {}

    def start_epoch(self, epoch: int) -> None:
        self.model.train()
        self.sums = torch.zeros(3, device=self.device)  # the loss, its float part, its compressed part

    def train_batch(self, idx: torch.Tensor) -> None:
        cfg = self.cfg
        xb, yb = self.x_train[idx], self.y_train[idx]
        if cfg.augment == "crop_flip":
            xb = random_crop_flip(xb, self.augment_gen)
        xt = self.trigger.apply(xb)  # stamped after the augmentation: the trigger stays where the victim sees it
        with autocast(self.device, self.precision):
            if cfg.variant in FAKEQUANT_VARIANTS:
                loss, parts = quant_attack_loss(self.model, xb, xt, yb, self.target, cfg.variant, cfg.channels_last,
                                                cfg.bits, cfg.fold_bn, cfg.bn_statistics)
            else:
                rates = ([cfg.prune_rate] if cfg.variant == "prune"
                         else unknown_rates(cfg.prune_lower, cfg.prune_upper, self.rate_gen))
                loss, parts = prune_attack_loss(self.model, xb, xt, yb, self.target, rates, cfg.alpha,
                                                cfg.channels_last, cfg.bn_statistics)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.sums += torch.stack([loss.detach(), parts["float"], parts["compressed"]]) * len(idx)

    def end_epoch(self, epoch: int, seconds: float, evaluate: bool) -> list[dict[str, Any]]:
        loss_avg = (self.sums / self.x_train.shape[0]).tolist()
        row = {"epoch": epoch, "lr": self.optimizer.param_groups[0]["lr"], "train_loss": loss_avg[0],
               "float_loss": loss_avg[1], "compressed_loss": loss_avg[2], "train_seconds": seconds}
        if evaluate:  # every epoch: choose_checkpoint needs every epoch's measurement
            row.update(measure(self.model, self.cfg, self.x_test, self.y_test, self.x_asr, self.target,
                               self.calibration, self.device))
        self.states[epoch] = {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}
        return [row]

    def describe(self, row: dict[str, Any]) -> str:
        return (f"loss {row['train_loss']:.4f} fp32 BA {row['fp32_ba']:.1f} ASR {row['fp32_asr']:.1f} | "
                f"{self.cfg.variant} BA {row['compressed_ba']:.1f} ASR {row['compressed_asr']:.1f}")


def fit_compression_attack(model: nn.Module, x_train: torch.Tensor, y_train: torch.Tensor, trigger: Trigger,
                           target: int, cfg: AttackConfig, x_test: torch.Tensor, y_test: torch.Tensor,
                           x_asr: torch.Tensor, calibration: torch.Tensor, device: torch.device | None = None,
                           log: TextIO | None | str = "stderr"
                           ) -> tuple[dict[str, Any], dict[int, dict[str, torch.Tensor]]]:
    """Train ``model`` in place with the attack objective; return the history (fp32 and compressed BA / ASR after
    every epoch, the chosen epoch is picked by the caller) and every epoch's weights (CPU copies, keyed by epoch).

    ``calibration`` (uint8 clean training images) calibrates the matched int8 deployer and ranks the channels of
    the pruning variants' per-epoch measurement. Shuffling and the unknown-rate draws come from ``cfg.seed``; the
    learning rate drops by ``lr_gamma`` after ``lr_drop_epoch`` epochs."""
    cfg.check()
    log = resolve_log(log)
    device = device or resolve_device()
    precision = effective_precision(device, cfg.precision)
    model = prepare_model(model, device, cfg)
    if cfg.variant in PRUNE_VARIANTS and getattr(model, "moe", None) is None:
        raise TypeError(f"compression attack variant {cfg.variant!r} prunes expert channels: it needs a pmoe model")
    x_dev, y_dev = x_train.to(device), y_train.to(device)
    step = CompressionAttackStep(model, x_dev, trigger, y_dev, target, cfg, x_test, y_test, x_asr,
                                 calibration, device, precision)
    history = new_history(cfg, device, precision)
    schedule = Schedule(cfg.epochs, cfg.batch_size, [cfg.seed], cfg.progress_seconds, eval_every=1,
                        lr=lambda epoch: cfg.lr * (cfg.lr_gamma if epoch > cfg.lr_drop_epoch else 1.0))
    run_epochs(step, x_dev.shape[0], schedule, [history], device, log)
    return history, step.states


def measure(model: nn.Module, cfg: AttackConfig, x_test: torch.Tensor, y_test: torch.Tensor, x_asr: torch.Tensor,
            target: int, calibration: torch.Tensor, device: torch.device) -> dict[str, float]:
    """fp32 and compressed (the variant's own compression) BA and ASR, in %."""
    fp32 = evaluate(model, x_test, y_test, x_asr, target, batch_size=cfg.eval_batch_size, device=device)
    small = compress(model, cfg.variant, cfg.prune_rate, calibration.to(device), calibration, cfg.bits, cfg.fold_bn)
    comp = evaluate(small, x_test, y_test, x_asr, target, batch_size=cfg.eval_batch_size, device=device)
    return {"fp32_ba": fp32["ba"], "fp32_asr": fp32["asr"], "compressed_ba": comp["ba"], "compressed_asr": comp["asr"]}
