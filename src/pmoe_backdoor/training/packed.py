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

import sys
import time
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
from .loop import Probe, TrainConfig, finish_epoch, fit, prepare_model, record_routing


def check_pack_configs(cfgs: Sequence[TrainConfig]) -> None:
    """Packed models share every training setting but ``seed``; raise ValueError naming the first that differs."""
    first = asdict(cfgs[0])
    for i, cfg in enumerate(cfgs[1:], 1):
        for key, value in asdict(cfg).items():
            if key != "seed" and value != first[key]:
                raise ValueError(f"packed training: config key {key!r} differs between model 0 ({first[key]!r}) "
                                 f"and model {i} ({value!r}); packed models may differ only in 'seed'")


def _log(stream: TextIO | None, msg: str) -> None:
    if stream is not None:
        print(msg, file=stream, flush=True)


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
    log = sys.stderr if log == "stderr" else log  # looked up per call, so redirected stderr is honoured
    device = device or resolve_device()
    if k_models == 1:
        return [fit(models[0], datasets[0][0], datasets[0][1], cfgs[0], x_test, y_test, probes[0], device, log)]
    check_pack_memory(models[0], cfgs[0], k_models, sizes[0], device, mode)
    return _train(models, datasets, cfgs, x_test, y_test, probes, device, log, mode)


def _train(models, datasets, cfgs, x_test, y_test, probes, device, log, mode) -> list[dict[str, Any]]:
    cfg, k_models, n = cfgs[0], len(models), int(datasets[0][0].shape[0])
    precision = effective_precision(device, cfg.precision)
    if precision != cfg.precision:
        _log(log, f"note: precision {cfg.precision!r} is not native on {device}; training in {precision}")
    models = [prepare_model(m, device, cfg) for m in models]
    histories: list[dict[str, Any]] = [
        {"config": asdict(c), "device": str(device), "precision": precision, "epochs": [], "routing": [],
         "probe_names": p.names if p else []} for c, p in zip(cfgs, probes)]
    for m, p, h in zip(models, probes, histories):
        if p is not None:
            h["routing_init"] = record_routing(m, p, device, cfg.channels_last)
    x_all = torch.stack([x.to(device) for x, _ in datasets])  # (K, N, 32, 32, 3) uint8
    y_all = torch.stack([y.to(device) for _, y in datasets])  # (K, N)
    packed = PackedModels(models, mode)
    opt = packed_optimizer(packed, cfg)
    forward = packed_forward(packed, cfg.compile, log)
    gens = [torch.Generator().manual_seed(c.seed) for c in cfgs]
    rows = torch.arange(k_models, device=device).unsqueeze(1)
    steps_per_epoch = -(-n // cfg.batch_size)
    for epoch in range(1, cfg.epochs + 1):
        perms = torch.stack([torch.randperm(n, generator=g) for g in gens]).to(device)
        loss_sum = torch.zeros(k_models, device=device)
        correct = torch.zeros(k_models, device=device, dtype=torch.long)
        t0 = last_report = time.perf_counter()
        for step, start in enumerate(range(0, n, cfg.batch_size), 1):
            idx = perms[:, start:start + cfg.batch_size]  # (K, b): each model's own batch
            xb, yb = packed_input(x_all[rows, idx], cfg.channels_last, mode), y_all.gather(1, idx)
            losses, logits = packed_step(forward, opt, xb, yb, device, precision)
            loss_sum += losses * yb.shape[1]  # on the device: no host synchronisation inside the step loop
            correct += (logits.argmax(2) == yb).sum(1)
            now = time.perf_counter()
            if cfg.progress_seconds and now - last_report >= cfg.progress_seconds:
                last_report = now
                _log(log, f"epoch {epoch}/{cfg.epochs} step {step}/{steps_per_epoch}: {k_models} packed models, "
                          f"{k_models * min(start + cfg.batch_size, n) / (now - t0):.0f} img/s in all")
        if device.type == "cuda":
            torch.cuda.synchronize()
        train_seconds = time.perf_counter() - t0
        packed.write_back()
        loss_host, correct_host = loss_sum.tolist(), correct.tolist()
        for k, (model, probe, hist) in enumerate(zip(models, probes, histories)):
            row = {"epoch": epoch, "train_loss": loss_host[k] / n, "train_acc": correct_host[k] / n,
                   "train_seconds": train_seconds, "images_per_s": n / train_seconds}
            finish_epoch(model, row, hist, cfg, epoch, x_all[k], x_test, y_test, probe, device, precision)
            _log(log, f"model {k + 1}/{k_models} epoch {epoch}/{cfg.epochs}: loss {row['train_loss']:.4f} "
                      f"acc {row['train_acc']:.4f}" + (f" test_acc {row['test_acc']:.4f}" if "test_acc" in row else ""))
        _log(log, f"epoch {epoch}/{cfg.epochs}: {k_models} packed models, {k_models * n / train_seconds:.0f} img/s "
                  f"in all ({n / train_seconds:.0f} per model, {train_seconds:.1f} s)")
    return histories
