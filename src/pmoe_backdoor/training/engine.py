"""The one training loop. It owns what every training shares: the epochs, the learning-rate schedule, one shuffled
permutation per model and epoch cut into index batches, the progress and epoch-end lines, when to evaluate, and
the history rows. What one batch does, and what an epoch adds, is the step's (:class:`TrainingStep`):

- :class:`pmoe_backdoor.training.loop.PlainStep`: one model, cross-entropy (``fit``; fine-tuning too);
- :class:`pmoe_backdoor.training.packed.PackedStep`: K models as one batched computation (``fit_packed``);
- :class:`pmoe_backdoor.attacks.compression.CompressionAttackStep`: the compression-activated attack.

The log lines, one format for every training (``pmoe-status`` reads them, :mod:`pmoe_backdoor.status_logs`):

    epoch 3/200 step 40/391 1234 img/s, 12 s                       progress, every ``progress_seconds``
    epoch 3/200: loss 1.2345 acc 0.5678 (1234 img/s, 31.6 s)       the end of an epoch (training seconds)

img/s counts every model's images, so K packed models report their throughput in all; they also write one
``model k/K epoch ...`` line each before the epoch's line, which gives the mean of their rows.
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Protocol, Sequence, TextIO, runtime_checkable

import torch


@runtime_checkable
class TrainingStep(Protocol):
    """What differs between trainings: one batch's forward, backward and update, and the epoch's extras."""

    model_count: int  # models one step trains: img/s and the epoch's lines count every model's
    optimizer: torch.optim.Optimizer  # the schedule sets its learning rate

    def start_epoch(self, epoch: int) -> None:
        """Before the epoch's first batch (and its shuffling): train mode, fresh accumulators."""

    def train_batch(self, idx: torch.Tensor) -> None:
        """One update on the training images ``idx`` indexes: (b,), or (K, b) with one row per packed model."""

    def end_epoch(self, epoch: int, seconds: float, evaluate: bool) -> list[dict[str, Any]]:
        """After the epoch's last batch: each model's history row (its extras done: BN recalibration, probe
        routing, checkpoints), evaluated when ``evaluate`` says the schedule wants it."""

    def describe(self, row: dict[str, Any]) -> str:
        """A row's metrics for its epoch line: ``loss ...``."""


@dataclass
class Schedule:
    """The loop's settings; ``seeds`` has one shuffling seed per model (more than one: packed models)."""

    epochs: int
    batch_size: int
    seeds: Sequence[int]
    progress_seconds: float = 0.0  # a progress line at most this often (0: none)
    eval_every: int = 1  # evaluate every N epochs and after the last (0: after the last only)
    lr: Callable[[int], float] | None = None  # the epoch's learning rate (None: the optimizer's stays)

    def evaluates(self, epoch: int) -> bool:
        return epoch == self.epochs or bool(self.eval_every and epoch % self.eval_every == 0)


def resolve_log(log: TextIO | None | str) -> TextIO | None:
    """``"stderr"`` is looked up per call, so that a redirected stderr is honoured."""
    return sys.stderr if log == "stderr" else log


def log_line(stream: TextIO | None, msg: str) -> None:
    if stream is not None:
        print(msg, file=stream, flush=True)


def new_history(config: Any, device: torch.device, precision: str, **extra: Any) -> dict[str, Any]:
    """A history before its first epoch: the config, where it trained, the rows to come and any ``extra``."""
    return {"config": asdict(config), "device": str(device), "precision": precision, "epochs": [], **extra}


def note_precision(log: TextIO | None, device: torch.device, asked: str, precision: str) -> None:
    if precision != asked:
        log_line(log, f"note: precision {asked!r} is not native on {device}; training in {precision}")


def run_epochs(step: TrainingStep, n: int, schedule: Schedule, histories: Sequence[dict[str, Any]],
               device: torch.device, log: TextIO | None) -> None:
    """Train ``schedule.epochs`` epochs of ``n`` images with ``step``, appending each model's rows to its history.

    The same seeds give the same batches: one generator per model draws one permutation per epoch, on the CPU,
    after the step's ``start_epoch``; the last partial batch is kept. Nothing inside the batch loop waits for the
    device, except a progress line when one is due."""
    gens = [torch.Generator().manual_seed(seed) for seed in schedule.seeds]
    steps_per_epoch = -(-n // schedule.batch_size)
    models = step.model_count
    for epoch in range(1, schedule.epochs + 1):
        if schedule.lr is not None:
            for group in step.optimizer.param_groups:
                group["lr"] = schedule.lr(epoch)
        step.start_epoch(epoch)
        perms = [torch.randperm(n, generator=g) for g in gens]
        order = (perms[0] if len(perms) == 1 else torch.stack(perms)).to(device)
        t0 = last_report = time.perf_counter()
        for batch, start in enumerate(range(0, n, schedule.batch_size), 1):
            step.train_batch(order[..., start:start + schedule.batch_size])
            now = time.perf_counter()
            if log is not None and schedule.progress_seconds and now - last_report >= schedule.progress_seconds:
                last_report = now
                images = models * min(start + schedule.batch_size, n)
                log_line(log, f"epoch {epoch}/{schedule.epochs} step {batch}/{steps_per_epoch} "
                              f"{images / (now - t0):.0f} img/s, {now - t0:.0f} s")
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        rows = step.end_epoch(epoch, seconds, schedule.evaluates(epoch))
        for history, row in zip(histories, rows, strict=True):
            history["epochs"].append(row)
        if len(rows) > 1:
            for k, row in enumerate(rows, 1):
                log_line(log, f"model {k}/{len(rows)} epoch {epoch}/{schedule.epochs}: {step.describe(row)}")
        summary = step.describe(rows[0] if len(rows) == 1 else mean_row(rows)) + (
            f", mean of {len(rows)} packed models" if len(rows) > 1 else "")
        log_line(log, f"epoch {epoch}/{schedule.epochs}: {summary} ({models * n / seconds:.0f} img/s, {seconds:.1f} s)")


def mean_row(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The mean over the models of each number in their rows (for the epoch line of packed models only)."""
    return {key: sum(row[key] for row in rows) / len(rows) for key, value in rows[0].items()
            if isinstance(value, (int, float))}
