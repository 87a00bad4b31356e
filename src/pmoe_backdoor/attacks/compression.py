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

All passes run the BatchNorms in training mode (batch statistics); only the float pass updates their running
statistics, which the released model and hence every compressed copy of it inherit. The release is chosen with the
authors' rule (:func:`choose_checkpoint`) from per-epoch measurements.
"""

from __future__ import annotations

import contextlib
import copy
import sys
import time
from dataclasses import asdict, dataclass, fields
from typing import Any, Sequence, TextIO

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from ..defenses.fine_pruning import channels_to_prune, expert_channel_means, prune_experts
from ..deployment.quantize import quantize_model
from ..evaluate import evaluate
from ..runtime import autocast, effective_precision, resolve_device, to_input
from ..training.loop import prepare_model
from .fakequant import FAKEQUANT_VARIANTS, deploy_faithful, fake_quant_forward
from .triggers import Trigger

PRUNE_VARIANTS = ("prune", "prune_unknown")
ATTACK_VARIANTS = FAKEQUANT_VARIANTS + PRUNE_VARIANTS


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


@contextlib.contextmanager
def frozen_bn_statistics(model: nn.Module):
    """BatchNorms still normalise with the batch's statistics but do not update their running ones (momentum 0):
    the compressed passes must not leak into the statistics of the released model, which the victim's compressed
    model inherits unchanged (BN stays float, it is not re-estimated)."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in bns]
    for m in bns:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, momentum in zip(bns, saved):
            m.momentum = momentum


def quant_attack_loss(model: nn.Module, x: torch.Tensor, x_trig: torch.Tensor, y: torch.Tensor, target: int,
                      variant: str, channels_last: bool = True, bits: int = 8
                      ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """CE(float model, [y ; y]) + CE(fake-quantised model, [y ; target]) on uint8 batches ``x`` and ``x_trig``."""
    xb = to_input(torch.cat([x, x_trig]), channels_last)
    y_float = torch.cat([y, y])
    y_attack = torch.cat([y, torch.full_like(y, target)])
    float_loss = F.cross_entropy(model(xb).float(), y_float)
    with frozen_bn_statistics(model):
        quant_loss = F.cross_entropy(fake_quant_forward(model, xb, variant, bits).float(), y_attack)
    return float_loss + quant_loss, {"float": float_loss.detach(), "compressed": quant_loss.detach()}


def unknown_rates(lower: float, upper: float, gen: torch.Generator) -> list[float]:
    """The unknown-rate branches of one batch: the upper bound, a uniform draw between the bounds, the lower bound."""
    drawn = lower + (upper - lower) * float(torch.rand((), generator=gen))
    return [upper, drawn, lower]


def pruned_forward(model: nn.Module, xb: torch.Tensor, pruned: list[torch.Tensor]) -> torch.Tensor:
    """The model's forward with the chosen expert channels' weights and biases zeroed (as prune_experts does), the
    other weights differentiable; the model itself is not changed."""
    conv = model.moe.expert_conv
    keep = torch.ones(conv.weight.shape[0], device=conv.weight.device, dtype=conv.weight.dtype)
    rows = torch.cat([idx + e * model.moe.expert_channels for e, idx in enumerate(pruned)]).to(keep.device)
    keep[rows] = 0
    params = {"moe.expert_conv.weight": conv.weight * keep.view(-1, 1, 1, 1), "moe.expert_conv.bias": conv.bias * keep}
    return functional_call(model, params, (xb,), strict=False)


def prune_attack_loss(model: nn.Module, x: torch.Tensor, x_trig: torch.Tensor, y: torch.Tensor, target: int,
                      rates: Sequence[float], alpha: float, channels_last: bool = True
                      ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """CE(float, [y ; y]) + alpha * sum over ``rates`` of CE(pruned at that rate, [y ; target]); the channels to
    prune are ranked on the batch's clean images ``x``, like Fine-Pruning's activation images."""
    means = expert_channel_means(model, x, batch_size=len(x))
    xb = to_input(torch.cat([x, x_trig]), channels_last)
    y_float = torch.cat([y, y])
    y_attack = torch.cat([y, torch.full_like(y, target)])
    float_loss = F.cross_entropy(model(xb).float(), y_float)
    with frozen_bn_statistics(model):
        pruned_loss = sum(F.cross_entropy(pruned_forward(model, xb, channels_to_prune(means, r)).float(), y_attack)
                          for r in rates)
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
             activation_images: torch.Tensor, bits: int = 8) -> nn.Module:
    """The model as the attack's victim runs it: quantised with the variant's scheme, or Fine-Pruned (no fine-tuning)
    at ``prune_rate`` with channels ranked on ``activation_images``."""
    if variant == "faithful":
        return deploy_faithful(model, bits)
    if variant == "matched":
        return quantize_model(model, "int8", calibration)
    pruned = copy.deepcopy(model).eval()
    prune_experts(pruned, channels_to_prune(expert_channel_means(pruned, activation_images), prune_rate))
    return pruned


def fit_compression_attack(model: nn.Module, x_train: torch.Tensor, y_train: torch.Tensor, trigger: Trigger,
                           target: int, cfg: AttackConfig, x_test: torch.Tensor, y_test: torch.Tensor,
                           x_asr: torch.Tensor, calibration: torch.Tensor, device: torch.device | None = None,
                           log: TextIO | None | str = "stderr"
                           ) -> tuple[dict[str, Any], dict[int, dict[str, torch.Tensor]]]:
    """Train ``model`` in place with the attack objective; return the history (fp32 and compressed BA / ASR after
    every epoch, the chosen epoch is picked by the caller) and every epoch's weights (CPU copies, keyed by epoch).

    ``calibration`` (uint8 clean training images) calibrates the matched int8 deployer and ranks the channels of
    the pruning variants' per-epoch measurement. Shuffling and the unknown-rate draws come from ``cfg.seed``."""
    cfg.check()
    log = sys.stderr if log == "stderr" else log
    device = device or resolve_device()
    precision = effective_precision(device, cfg.precision)
    model = prepare_model(model, device, cfg)
    if cfg.variant in PRUNE_VARIANTS and getattr(model, "moe", None) is None:
        raise TypeError(f"compression attack variant {cfg.variant!r} prunes expert channels: it needs a pmoe model")
    x_dev, y_dev = x_train.to(device), y_train.to(device)
    x_trig_dev = trigger.apply(x_dev)
    n = x_dev.shape[0]
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    rate_gen = torch.Generator().manual_seed(cfg.seed + 1)
    history: dict[str, Any] = {"config": asdict(cfg), "device": str(device), "precision": precision, "epochs": []}
    states: dict[int, dict[str, torch.Tensor]] = {}
    for epoch in range(1, cfg.epochs + 1):
        lr = cfg.lr * (cfg.lr_gamma if epoch > cfg.lr_drop_epoch else 1.0)
        for group in opt.param_groups:
            group["lr"] = lr
        model.train()
        perm = torch.randperm(n, generator=gen).to(device)
        sums = torch.zeros(3, device=device)
        t0 = last_report = time.perf_counter()
        for start in range(0, n, cfg.batch_size):
            idx = perm[start:start + cfg.batch_size]
            xb, xt, yb = x_dev[idx], x_trig_dev[idx], y_dev[idx]
            with autocast(device, precision):
                if cfg.variant in FAKEQUANT_VARIANTS:
                    loss, parts = quant_attack_loss(model, xb, xt, yb, target, cfg.variant, cfg.channels_last,
                                                      cfg.bits)
                else:
                    rates = ([cfg.prune_rate] if cfg.variant == "prune"
                             else unknown_rates(cfg.prune_lower, cfg.prune_upper, rate_gen))
                    loss, parts = prune_attack_loss(model, xb, xt, yb, target, rates, cfg.alpha, cfg.channels_last)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sums += torch.stack([loss.detach(), parts["float"], parts["compressed"]]) * len(idx)
            now = time.perf_counter()
            if log is not None and cfg.progress_seconds and now - last_report >= cfg.progress_seconds:
                last_report = now  # an in-epoch line, as fit() writes, so pmoe-status and a reader see progress
                print(f"epoch {epoch}/{cfg.epochs} {min(start + cfg.batch_size, n) / (now - t0):.0f} img/s, "
                      f"{now - t0:.0f} s", file=log, flush=True)
        seconds = time.perf_counter() - t0
        loss_avg = (sums / n).tolist()
        row = {"epoch": epoch, "lr": lr, "train_loss": loss_avg[0], "float_loss": loss_avg[1],
               "compressed_loss": loss_avg[2], "train_seconds": seconds}
        row.update(measure(model, cfg, x_test, y_test, x_asr, target, calibration, device))
        history["epochs"].append(row)
        states[epoch] = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        if log is not None:
            print(f"epoch {epoch}/{cfg.epochs}: loss {row['train_loss']:.4f} fp32 BA {row['fp32_ba']:.1f} "
                  f"ASR {row['fp32_asr']:.1f} | {cfg.variant} BA {row['compressed_ba']:.1f} "
                  f"ASR {row['compressed_asr']:.1f} ({seconds:.1f} s)", file=log, flush=True)
    return history, states


def measure(model: nn.Module, cfg: AttackConfig, x_test: torch.Tensor, y_test: torch.Tensor, x_asr: torch.Tensor,
            target: int, calibration: torch.Tensor, device: torch.device) -> dict[str, float]:
    """fp32 and compressed (the variant's own compression) BA and ASR, in %."""
    fp32 = evaluate(model, x_test, y_test, x_asr, target, batch_size=cfg.eval_batch_size, device=device)
    small = compress(model, cfg.variant, cfg.prune_rate, calibration.to(device), calibration, cfg.bits)
    comp = evaluate(small, x_test, y_test, x_asr, target, batch_size=cfg.eval_batch_size, device=device)
    return {"fp32_ba": fp32["ba"], "fp32_asr": fp32["asr"], "compressed_ba": comp["ba"], "compressed_asr": comp["asr"]}
