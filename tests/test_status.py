"""Tests of pmoe_backdoor.status (pmoe-status) on hand-made training logs."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from pmoe_backdoor.status import collect, duration, main, parse_log, remaining_seconds, render

RUNNING = """device cuda:0, threads 4, start-up 3.2 s
training set poisoned at 1000 indices, target 0
epoch 1/10: loss 1.9000 acc 0.3000 (4210 img/s, 12.0 s)
epoch 2/10: loss 1.5000 acc 0.4500 test_acc 0.4100 (4300 img/s, 10.0 s)
epoch 3/10 step 200/400 4350 img/s, 5 s
"""
DONE = "".join(f"epoch {e}/3: loss 1.0 acc 0.5 test_acc 0.5000 (5000 img/s, 10.0 s)\n" for e in (1, 2, 3))
FAILED = """epoch 1/10: loss 1.9 acc 0.3 (4000 img/s, 12.5 s)
Traceback (most recent call last):
  File "train_model.py", line 5, in <module>
torch.OutOfMemoryError: CUDA out of memory
"""
PACKED = """epoch 1/4 step 5/10: 4 packed models, 8000 img/s in all
model 1/4 epoch 1/4: loss 2.0 acc 0.2
epoch 1/4: 4 packed models, 8000 img/s in all (2000 per model, 20.0 s)
epoch 2/4 step 5/10: 4 packed models, 7600 img/s in all
"""


def test_parse_a_running_log_and_its_eta():
    st = parse_log(RUNNING)
    assert (st.total, st.finished, st.epoch, st.img_s, st.elapsed) == (10, 2, 3, 4350.0, 5.0)
    assert st.epoch_seconds == [12.0, 10.0] and st.fraction == 0.5 and not st.failed
    # 11 s per epoch (the mean of the two): 6 s left of epoch 3, then 7 epochs
    assert remaining_seconds(st) == pytest.approx(6 + 7 * 11)


def test_parse_progress_lines_without_elapsed_time_or_finished_epochs():
    st = parse_log("epoch 1/5 step 10/40 900 img/s\n")  # the progress line before it gave the seconds
    assert (st.epoch, st.finished, st.fraction, st.elapsed) == (1, 0, 0.25, None)
    assert remaining_seconds(st) is None  # nothing to time an epoch by yet
    st = parse_log("epoch 1/5 step 10/40 900 img/s, 30 s\n")
    assert remaining_seconds(st) == pytest.approx(120 - 30 + 4 * 120)  # 30 s for a quarter epoch
    st = parse_log(RUNNING.replace(", 5 s", ""))
    assert remaining_seconds(st) == pytest.approx(0.5 * 11 + 7 * 11)


def test_parse_done_failed_and_packed_logs():
    st = parse_log(DONE)
    assert (st.finished, st.total, st.epoch_seconds) == (3, 3, [10.0] * 3)
    assert remaining_seconds(st) == 0
    assert parse_log(FAILED).failed
    st = parse_log(PACKED)
    assert (st.finished, st.epoch, st.total, st.img_s, st.epoch_seconds) == (1, 2, 4, 7600.0, [20.0])


def _write(root: Path, name: str, text: str, age: float = 0.0) -> None:
    path = root / "results" / "logs" / f"{name}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    t = time.time() - age
    os.utime(path, (t, t))


@pytest.fixture()
def workdir(tmp_path: Path) -> Path:
    _write(tmp_path, "train_model/c10/pmoe/square-2/seed0", RUNNING)
    _write(tmp_path, "train_model/c10/pmoe/clean/seed0", DONE, age=3600)
    _write(tmp_path, "train_model/c10/pmoe/clean/seed1", FAILED)
    _write(tmp_path, "train_model/c10/pmoe/clean/seed2", RUNNING, age=1200)  # quiet for 20 min
    _write(tmp_path, "train_model/c10/pmoe/clean/seed3", "device cuda:0\n")
    _write(tmp_path, "fine_prune/c10/pmoe/square-2/seed0/authors/10", "{'before': 1}\n" + DONE)
    _write(tmp_path, "evaluate/c10/pmoe/clean/seed0", DONE)  # not a training job: not listed
    return tmp_path


def test_collect_states_and_order(workdir: Path):
    jobs = collect(workdir, stall_seconds=300)
    states = {j.name: j.state for j in jobs}
    assert states == {
        "train_model/c10/pmoe/square-2/seed0": "running",
        "train_model/c10/pmoe/clean/seed0": "done",
        "train_model/c10/pmoe/clean/seed1": "failed",
        "train_model/c10/pmoe/clean/seed2": "stalled",
        "train_model/c10/pmoe/clean/seed3": "starting",
        "fine_prune/c10/pmoe/square-2/seed0/authors/10": "done",
    }
    assert [j.state for j in jobs] == ["done", "done", "failed", "stalled", "starting", "running"]
    running = jobs[-1]
    assert running.eta == pytest.approx(83, abs=2)


def test_render_one_line_per_job_and_a_total(workdir: Path):
    text = render(collect(workdir))
    lines = text.splitlines()
    assert lines[0].split() == ["job", "epoch", "img/s", "ETA", "state", "log", "updated"]
    assert len(lines) == 1 + 6 + 1
    row = lines[-2].split()
    assert row[:6] == ["train_model/c10/pmoe/square-2/seed0", "3/10", "(50%)", "4350", "1m23s", "running"]
    assert lines[-1] == ("total: 6 jobs (1 running, 1 starting, 1 stalled, 1 failed, 2 done); epochs 11/36; "
                         "4350 img/s; ETA 1m23s")


def test_cli(workdir: Path, capsys):
    assert main([str(workdir), "--active"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 + 4 + 1 and not any(" done " in line for line in out[1:-1])
    assert out[-1].startswith("total: 6 jobs")
    assert main([str(workdir / "nowhere")]) == 1


def test_duration():
    assert [duration(s) for s in (None, 5, 125, 7380, 180000)] == ["?", "5s", "2m05s", "2h03m", "2d02h"]


def test_reads_the_lines_fit_writes():
    import io

    import torch

    from pmoe_backdoor.train import TrainConfig, fit

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 4))
    x, y = torch.randint(0, 256, (64, 32, 32, 3), dtype=torch.uint8), torch.randint(0, 4, (64,))
    cfg = TrainConfig(epochs=2, batch_size=16, lr=0.01, progress_seconds=1e-9, channels_last=False,
                      recalibrate_bn=False)
    log = io.StringIO()
    fit(model, x, y, cfg, device=torch.device("cpu"), log=log)
    lines = log.getvalue().splitlines()
    assert any(" step " in line for line in lines)
    st = parse_log("\n".join(lines[:-1]))  # the last epoch under way: its progress lines read
    assert (st.finished, st.epoch, st.total, st.fraction) == (1, 2, 2, 1.0) and st.elapsed is not None
    st = parse_log(log.getvalue())
    assert (st.finished, st.total, len(st.epoch_seconds)) == (2, 2, 2) and st.img_s > 0
