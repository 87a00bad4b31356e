"""Plain training of one model (``fit``): its config, its step for the one training loop
(:mod:`pmoe_backdoor.training.engine`), and the per-epoch extras it shares with packed training (evaluation of the
clean test set, BN recalibration, the routing of probe images). The dataset is one uint8 tensor on the device, cut
into index-slice batches of one permutation per epoch: no per-sample Python, no host synchronisation inside the
step loop.

Faithful defaults (docs/faithful-behaviour.md §2): x/255 inputs without normalisation or augmentation, SGD lr 0.1
without momentum or weight decay, constant rate, 25 epochs, batch 128, reshuffle each epoch, last partial batch
kept, cross-entropy on logits, clean test accuracy after every epoch, routing of fixed probe images recorded
every epoch.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, fields
from typing import Any, TextIO

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..runtime import PRECISIONS, autocast, compiled_or_eager, effective_precision, resolve_device, to_input
from .engine import Schedule, new_history, note_precision, resolve_log, run_epochs


@dataclass
class TrainConfig:
    epochs: int = 25
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0
    seed: int = 0
    precision: str = "fp32"
    channels_last: bool = True
    compile: bool = False
    eval_every: int = 1  # evaluate the clean test set every N epochs (0: only after the last epoch)
    eval_batch_size: int = 1000
    progress_seconds: float = 10.0  # an in-epoch progress line at most this often (0: off)
    # departure (off = faithful): after the last epoch, replace the BN running statistics by exact averages
    # over the training set, so that short CPU runs are not judged on statistics that still lag the weights
    recalibrate_bn: bool = False

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "TrainConfig":
        d = dict(d or {})
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"training config: unknown key(s) {sorted(unknown)}; known: {sorted(known)}")
        cfg = cls(**d)
        cfg.check()
        return cfg

    def check(self) -> None:
        for name in ("epochs", "batch_size", "eval_batch_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"training config: '{name}' must be a positive integer, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"training config: 'lr' must be positive, got {self.lr}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"training config: 'precision' must be one of {PRECISIONS}, got {self.precision!r}")
        if self.nesterov and self.momentum <= 0:
            raise ValueError("training config: 'nesterov' needs a positive 'momentum'")


def prepare_model(model: nn.Module, device: torch.device, cfg: TrainConfig) -> nn.Module:
    model = model.to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


@dataclass
class Probe:
    """Fixed images whose routing (top-k positions per expert) is recorded after every epoch."""
    images: torch.Tensor  # uint8 (P, 32, 32, 3)
    names: list[str]


def record_routing(model: nn.Module, probe: Probe, device: torch.device, channels_last: bool = True
                   ) -> list[list[list[int]]] | None:
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        _, idx = model(to_input(probe.images.to(device), channels_last), return_routing=True)
    model.train(was_training)
    return None if idx is None else idx.sort(dim=-1).values.cpu().tolist()


class PlainStep:
    """One model, cross-entropy on its logits, SGD: ``fit``'s step (also the defenses' fine-tuning)."""

    model_count = 1

    def __init__(self, model: nn.Module, x_train: torch.Tensor, y_train: torch.Tensor, cfg: TrainConfig,
                 x_test: torch.Tensor | None, y_test: torch.Tensor | None, probe: Probe | None,
                 history: dict[str, Any], device: torch.device, precision: str, log: TextIO | None):
        self.model, self.x_train, self.y_train, self.cfg = model, x_train, y_train, cfg
        self.x_test, self.y_test, self.probe, self.history = x_test, y_test, probe, history
        self.device, self.precision = device, precision
        self.optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                         nesterov=cfg.nesterov, weight_decay=cfg.weight_decay)
        self.forward = compiled_or_eager(model, cfg.compile, log, "the model")

    def start_epoch(self, epoch: int) -> None:
        self.model.train()
        self.loss_sum = torch.zeros((), device=self.device)
        self.correct = torch.zeros((), device=self.device, dtype=torch.long)

    def train_batch(self, idx: torch.Tensor) -> None:
        xb, yb = to_input(self.x_train[idx], self.cfg.channels_last), self.y_train[idx]
        with autocast(self.device, self.precision):
            logits = self.forward(xb)
        loss = F.cross_entropy(logits.float(), yb)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        # accumulate on the device: no host synchronisation inside the step loop
        self.loss_sum += loss.detach() * yb.shape[0]
        self.correct += (logits.detach().argmax(1) == yb).sum()

    def end_epoch(self, epoch: int, seconds: float, evaluate: bool) -> list[dict[str, Any]]:
        n = self.x_train.shape[0]
        row = {"epoch": epoch, "train_loss": self.loss_sum.item() / n, "train_acc": self.correct.item() / n,
               "train_seconds": seconds, "images_per_s": n / seconds}
        finish_epoch(self.model, row, self.history, self.cfg, epoch, evaluate, self.x_train, self.x_test,
                     self.y_test, self.probe, self.device, self.precision)
        return [row]

    def describe(self, row: dict[str, Any]) -> str:
        return describe_row(row)


def describe_row(row: dict[str, Any]) -> str:
    """The epoch line's metrics of ``fit`` and ``fit_packed``."""
    return (f"loss {row['train_loss']:.4f} acc {row['train_acc']:.4f}"
            + (f" test_acc {row['test_acc']:.4f}" if "test_acc" in row else ""))


def fit(model: nn.Module, x_train: torch.Tensor, y_train: torch.Tensor, cfg: TrainConfig,
        x_test: torch.Tensor | None = None, y_test: torch.Tensor | None = None, probe: Probe | None = None,
        device: torch.device | None = None, log: TextIO | None | str = "stderr") -> dict[str, Any]:
    """Train ``model`` in place; return the history (per-epoch metrics, routing of the probe images).

    ``x_*`` are uint8 (N, 32, 32, 3) tensors, ``y_*`` int64. The same seed on the same CPU gives the same
    weights: shuffling uses its own generator seeded from ``cfg.seed``; the caller seeds model init.
    """
    cfg.check()
    log = resolve_log(log)
    device = device or resolve_device()
    precision = effective_precision(device, cfg.precision)
    note_precision(log, device, cfg.precision, precision)
    model = prepare_model(model, device, cfg)
    x_dev, y_dev = x_train.to(device), y_train.to(device)
    history = new_history(cfg, device, precision, routing=[], probe_names=probe.names if probe else [])
    if probe is not None:
        history["routing_init"] = record_routing(model, probe, device, cfg.channels_last)
    step = PlainStep(model, x_dev, y_dev, cfg, x_test, y_test, probe, history, device, precision, log)
    run_epochs(step, x_dev.shape[0], train_schedule(cfg, [cfg.seed]), [history], device, log)
    return history


def train_schedule(cfg: TrainConfig, seeds: list[int]) -> Schedule:
    """The loop's schedule of a TrainConfig: a constant learning rate, the optimizer's own."""
    return Schedule(cfg.epochs, cfg.batch_size, seeds, cfg.progress_seconds, cfg.eval_every)


def finish_epoch(model: nn.Module, row: dict[str, Any], history: dict[str, Any], cfg: TrainConfig, epoch: int,
                 evaluate: bool, x_train: torch.Tensor, x_test: torch.Tensor | None, y_test: torch.Tensor | None,
                 probe: Probe | None, device: torch.device, precision: str) -> None:
    """After an epoch's steps: recalibrate BN after the last one (if asked), evaluate the clean test set when the
    schedule says so, record the probe's routing (shared by ``fit``'s and ``fit_packed``'s steps)."""
    from ..evaluate import predict_logits  # evaluate imports runtime only; imported here, train stays its base

    if epoch == cfg.epochs and cfg.recalibrate_bn:
        recalibrate_bn(model, x_train, cfg.eval_batch_size, device, precision, cfg.channels_last)
    if x_test is not None and evaluate:
        t1 = time.perf_counter()
        logits = predict_logits(model, x_test, device, cfg.eval_batch_size, precision, cfg.channels_last)
        yt = y_test.to(logits.device)
        row["test_loss"] = F.cross_entropy(logits, yt).item()
        row["test_acc"] = (logits.argmax(1) == yt).float().mean().item()
        row["eval_seconds"] = time.perf_counter() - t1
    if probe is not None:
        history["routing"].append(record_routing(model, probe, device, cfg.channels_last))


@torch.no_grad()
def recalibrate_bn(model: nn.Module, x: torch.Tensor, batch_size: int, device: torch.device, precision: str,
                   channels_last: bool = True) -> None:
    """Set every BatchNorm's running mean/variance to the average over ``x`` of the batch statistics."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average
    was_training = model.training
    model.train()
    with autocast(device, precision):
        for start in range(0, x.shape[0], batch_size):
            model(to_input(x[start:start + batch_size].to(device), channels_last))
    for m, mom in zip(bns, saved):
        m.momentum = mom
    model.train(was_training)
