"""Packed training: K models of one architecture trained in one process as one batched computation.

Each model keeps its own initial weights (the caller builds and seeds it as for a separate run), its own
training set (all of the same size N, so every step's batch has the same size in every model) and its own
shuffling: one generator per model seeded from its ``cfg.seed`` draws the permutations that
:func:`pmoe_backdoor.training.loop.fit` would draw. One step trains all K (:mod:`pmoe_backdoor.models.packed`): the loss
is the sum of the models' mean cross-entropies, whose gradient with respect to each model's (disjoint)
parameters is that model's own gradient, and SGD with momentum, Nesterov and weight decay is elementwise, so
one optimizer over the stacked parameters updates each model as its own optimizer would. After every epoch the
stacked weights are copied back into the caller's modules, which are evaluated one by one with ``fit``'s code;
each model gets a history in ``fit``'s format. Same results as separate runs up to float32 rounding order (the
grouped convolution sums in another order), the same kind of difference as changing the thread count.

When it pays (one H100, batch 128, benchmarks/packed_throughput.py): at narrow widths, where one model leaves the
GPU idle (widen 2: K=16 gives 2.3x the images/s of one model eagerly, 4.3x with ``compile``); not at the paper's
widen 10, where one model already fills the GPU (packed 0.55-0.95x eagerly, 0.99x compiled): use pack 1 there.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any, Sequence, TextIO

import torch
import torch.nn as nn

from ..models.packed import (
    PackedModels,
    check_pack_memory,
    check_pack_models,
    packed_forward,
    packed_input,
    packed_optimizer,
    packed_step,
)
from ..runtime import effective_precision, resolve_device
from .engine import new_history, note_precision, resolve_log, run_epochs
from .loop import Probe, TrainConfig, describe_row, finish_epoch, fit, prepare_model, record_routing, train_schedule


def check_pack_configs(cfgs: Sequence[TrainConfig]) -> None:
    """Packed models share every training setting but ``seed``; raise ValueError naming the first that differs."""
    first = asdict(cfgs[0])
    for i, cfg in enumerate(cfgs[1:], 1):
        for key, value in asdict(cfg).items():
            if key != "seed" and value != first[key]:
                raise ValueError(f"packed training: config key {key!r} differs between model 0 ({first[key]!r}) "
                                 f"and model {i} ({value!r}); packed models may differ only in 'seed'")


def fit_packed(models: Sequence[nn.Module], datasets: Sequence[tuple[torch.Tensor, torch.Tensor]],
               cfgs: Sequence[TrainConfig], x_test: torch.Tensor | None = None, y_test: torch.Tensor | None = None,
               probes: Sequence[Probe | None] | None = None, device: torch.device | None = None,
               log: TextIO | None | str = "stderr", mode: str = "vmap") -> list[dict[str, Any]]:
    """Train the K ``models`` in place as one batched computation; return one ``fit``-format history each.

    ``datasets[k]`` is model k's (uint8 (N, 32, 32, 3), int64 (N,)) training set, the same N for all;
    ``cfgs[k]`` its TrainConfig (only ``seed`` may differ); ``probes[k]`` its probe images or None; the clean
    test set is shared. On CUDA, raises ValueError naming ``train.pack`` if K models would not fit in memory.
    With K == 1 this is :func:`pmoe_backdoor.training.loop.fit`. ``mode``: see :class:`PackedModels`.
    """
    k_models = len(models)
    probes = list(probes) if probes is not None else [None] * k_models
    if not k_models or not len(datasets) == len(cfgs) == len(probes) == k_models:
        raise ValueError(f"packed training: need one dataset, config and probe entry per model; got {k_models} "
                         f"models, {len(datasets)} datasets, {len(cfgs)} configs, {len(probes)} probes")
    for cfg in cfgs:
        cfg.check()
    check_pack_configs(cfgs)
    check_pack_models(models)
    sizes = [int(x.shape[0]) for x, _ in datasets]
    if len(set(sizes)) != 1 or any(int(y.shape[0]) != n for (_, y), n in zip(datasets, sizes)):
        raise ValueError(f"packed training: every model's training set must hold the same number of images "
                         f"and labels; got {sizes} images and {[int(y.shape[0]) for _, y in datasets]} labels")
    log = resolve_log(log)
    device = device or resolve_device()
    if k_models == 1:
        return [fit(models[0], datasets[0][0], datasets[0][1], cfgs[0], x_test, y_test, probes[0], device, log)]
    check_pack_memory(models[0], cfgs[0], k_models, sizes[0], device, mode)
    return _train(models, datasets, cfgs, x_test, y_test, probes, device, log, mode)


class PackedStep:
    """K models' SGD step as one batched computation (:mod:`pmoe_backdoor.models.packed`); after each epoch the
    stacked weights go back into the models, which get ``fit``'s extras and rows one by one."""

    def __init__(self, models: Sequence[nn.Module], x_all: torch.Tensor, y_all: torch.Tensor, cfg: TrainConfig,
                 x_test: torch.Tensor | None, y_test: torch.Tensor | None, probes: Sequence[Probe | None],
                 histories: Sequence[dict[str, Any]], device: torch.device, precision: str, log: TextIO | None,
                 mode: str):
        self.models, self.x_all, self.y_all, self.cfg = list(models), x_all, y_all, cfg
        self.x_test, self.y_test, self.probes, self.histories = x_test, y_test, probes, histories
        self.device, self.precision, self.mode = device, precision, mode
        self.model_count = len(self.models)
        self.packed = PackedModels(self.models, mode)
        self.optimizer = packed_optimizer(self.packed, cfg)
        self.forward = packed_forward(self.packed, cfg.compile, log)
        self.model_index = torch.arange(self.model_count, device=device).unsqueeze(1)  # (K, 1): gathers by row

    def start_epoch(self, epoch: int) -> None:
        self.loss_sum = torch.zeros(self.model_count, device=self.device)
        self.correct = torch.zeros(self.model_count, device=self.device, dtype=torch.long)

    def train_batch(self, idx: torch.Tensor) -> None:
        # idx (K, b): each model's own batch
        xb = packed_input(self.x_all[self.model_index, idx], self.cfg.channels_last, self.mode)
        yb = self.y_all.gather(1, idx)
        losses, logits = packed_step(self.forward, self.optimizer, xb, yb, self.device, self.precision)
        self.loss_sum += losses * yb.shape[1]  # on the device: no host synchronisation inside the step loop
        self.correct += (logits.argmax(2) == yb).sum(1)

    def end_epoch(self, epoch: int, seconds: float, evaluate: bool) -> list[dict[str, Any]]:
        n = self.x_all.shape[1]
        self.packed.write_back()
        loss_host, correct_host = self.loss_sum.tolist(), self.correct.tolist()
        rows = []
        for k, (model, probe, hist) in enumerate(zip(self.models, self.probes, self.histories)):
            row = {"epoch": epoch, "train_loss": loss_host[k] / n, "train_acc": correct_host[k] / n,
                   "train_seconds": seconds, "images_per_s": n / seconds}
            finish_epoch(model, row, hist, self.cfg, epoch, evaluate, self.x_all[k], self.x_test, self.y_test,
                         probe, self.device, self.precision)
            rows.append(row)
        return rows

    def describe(self, row: dict[str, Any]) -> str:
        return describe_row(row)


def _train(models, datasets, cfgs, x_test, y_test, probes, device, log, mode) -> list[dict[str, Any]]:
    cfg, n = cfgs[0], int(datasets[0][0].shape[0])
    precision = effective_precision(device, cfg.precision)
    note_precision(log, device, cfg.precision, precision)
    models = [prepare_model(m, device, cfg) for m in models]
    histories = [new_history(c, device, precision, routing=[], probe_names=p.names if p else [])
                 for c, p in zip(cfgs, probes)]
    for m, p, h in zip(models, probes, histories):
        if p is not None:
            h["routing_init"] = record_routing(m, p, device, cfg.channels_last)
    x_all = torch.stack([x.to(device) for x, _ in datasets])  # (K, N, 32, 32, 3) uint8
    y_all = torch.stack([y.to(device) for _, y in datasets])  # (K, N)
    step = PackedStep(models, x_all, y_all, cfg, x_test, y_test, probes, histories, device, precision, log, mode)
    run_epochs(step, n, train_schedule(cfg, [c.seed for c in cfgs]), histories, device, log)
    return histories
