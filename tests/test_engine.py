"""The one training loop (pmoe_backdoor.training.engine): plain, packed and compression-attack training differ only
in their step, and all three write the same log lines, which pmoe-status reads."""

from __future__ import annotations

import io
import re

import pytest
import torch
import torch.nn as nn

from pmoe_backdoor import status_logs
from pmoe_backdoor.attacks import compression
from pmoe_backdoor.attacks.compression import AttackConfig, CompressionAttackStep, fit_compression_attack
from pmoe_backdoor.attacks.triggers import SquareTrigger
from pmoe_backdoor.training import engine, loop, packed
from pmoe_backdoor.training.engine import Schedule, TrainingStep, run_epochs
from pmoe_backdoor.training.loop import PlainStep, TrainConfig, fit
from pmoe_backdoor.training.packed import PackedStep, fit_packed

CPU = torch.device("cpu")
EPOCHS = 2
# the one format, stricter than status_logs' patterns (which also read the older lines of logs already on disk)
PROGRESS_LINE = re.compile(r"^epoch \d+/\d+ step \d+/\d+ \d+ img/s, \d+ s$")
EPOCH_LINE = re.compile(r"^epoch \d+/\d+: loss \d+\.\d{4} .*\(\d+ img/s, \d+\.\d s\)$")

pytestmark = pytest.mark.usefixtures("one_thread")


def _data(n: int = 40):
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, 32, 32, 3), dtype=torch.uint8, generator=gen), torch.arange(n) % 4


def _model() -> nn.Module:
    return nn.Sequential(nn.AvgPool2d(8), nn.Flatten(), nn.Linear(48, 4))


def _train_all_three() -> dict[str, str]:
    """Each training on a tiny linear model, a progress line after every batch; the log of each."""
    x, y = _data()
    torch.manual_seed(0)
    cfg = TrainConfig(epochs=EPOCHS, batch_size=16, lr=0.01, progress_seconds=1e-9, channels_last=False)
    logs = {name: io.StringIO() for name in ("plain", "packed", "attack")}
    fit(_model(), x, y, cfg, x, y, device=CPU, log=logs["plain"])
    fit_packed([_model(), _model()], [(x, y), (x, y)], [cfg, cfg], x, y, device=CPU, log=logs["packed"])
    trigger = SquareTrigger(size=6, value=255, row=24, col=24)
    attack = AttackConfig(variant="matched", epochs=EPOCHS, batch_size=16, lr_drop_epoch=1, progress_seconds=1e-9)
    fit_compression_attack(_model(), x, y, trigger, 1, attack, x, y, trigger.apply(x), x, device=CPU,
                           log=logs["attack"])
    return {name: log.getvalue() for name, log in logs.items()}


def test_the_three_trainings_go_through_the_one_loop_with_their_own_step(monkeypatch):
    assert loop.run_epochs is packed.run_epochs is compression.run_epochs is engine.run_epochs
    steps = []

    def spy(step, *args, **kwargs):
        steps.append(step)
        return engine.run_epochs(step, *args, **kwargs)

    for module in (loop, packed, compression):
        monkeypatch.setattr(module, "run_epochs", spy)
    _train_all_three()
    assert [type(s) for s in steps] == [PlainStep, PackedStep, CompressionAttackStep]
    assert all(isinstance(s, TrainingStep) for s in steps)
    assert [s.model_count for s in steps] == [1, 2, 1]


def test_the_three_trainings_write_one_log_format_that_status_reads():
    for name, text in _train_all_three().items():
        lines = text.splitlines()
        epoch_lines = [line for line in lines if line.startswith("epoch ")]
        # the only other lines: packed models' own rows, which pmoe-status skips
        assert all(line.startswith("model ") for line in lines if line not in epoch_lines), (name, lines)
        assert (name == "packed") == any(line.startswith("model ") for line in lines)
        progress = [line for line in epoch_lines if " step " in line]
        ends = [line for line in epoch_lines if line not in progress]
        assert len(progress) == EPOCHS * 3 and len(ends) == EPOCHS, (name, lines)  # 40 images: batches 16, 16, 8
        for line in progress:
            m = status_logs.PROGRESS.match(line)
            assert PROGRESS_LINE.match(line) and m and m[3] and m[6], (name, line)
        for line in ends:
            m = status_logs.EPOCH_END.match(line)
            assert EPOCH_LINE.match(line) and m and m[3], (name, line)
        st = status_logs.parse_log("\n".join(lines[:lines.index(ends[-1])]))  # the last epoch under way
        assert (st.finished, st.epoch, st.total, st.fraction) == (EPOCHS - 1, EPOCHS, EPOCHS, 1.0), name
        st = status_logs.parse_log(text)
        assert (st.finished, st.total, len(st.epoch_seconds)) == (EPOCHS, EPOCHS, EPOCHS) and st.img_s > 0, name


class RecordingStep:
    """A step that trains nothing and records what the loop asks of it."""

    model_count = 1

    def __init__(self):
        self.optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
        self.calls: list[tuple] = []

    def start_epoch(self, epoch):
        self.calls.append(("start", epoch, self.optimizer.param_groups[0]["lr"]))

    def train_batch(self, idx):
        self.calls.append(("batch", idx.tolist()))

    def end_epoch(self, epoch, seconds, evaluate):
        self.calls.append(("end", epoch, evaluate))
        return [{"epoch": epoch, "train_loss": 0.0}]

    def describe(self, row):
        return f"loss {row['train_loss']:.4f}"


def test_the_loop_owns_schedule_shuffling_evaluation_and_history():
    step, history = RecordingStep(), {"epochs": []}
    schedule = Schedule(epochs=4, batch_size=4, seeds=[3], eval_every=3, lr=lambda epoch: 0.1 / epoch)
    log = io.StringIO()
    run_epochs(step, 10, schedule, [history], CPU, log)
    assert isinstance(step, TrainingStep)
    starts = [c for c in step.calls if c[0] == "start"]
    assert starts == [("start", e, pytest.approx(0.1 / e)) for e in (1, 2, 3, 4)]  # the lr set before each epoch
    assert [c[2] for c in step.calls if c[0] == "end"] == [False, False, True, True]  # every 3rd and the last
    gen = torch.Generator().manual_seed(3)
    for epoch in range(4):
        perm = torch.randperm(10, generator=gen).tolist()
        batches = [c[1] for c in step.calls if c[0] == "batch"][3 * epoch:3 * epoch + 3]
        assert batches == [perm[:4], perm[4:8], perm[8:]]  # one permutation per epoch, the partial batch kept
    assert [r["epoch"] for r in history["epochs"]] == [1, 2, 3, 4]
    assert all(EPOCH_LINE.match(line) for line in log.getvalue().splitlines())
