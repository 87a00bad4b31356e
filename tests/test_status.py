"""Tests of pmoe_backdoor.status (pmoe-status) on hand-made training logs."""

from __future__ import annotations

import os
import re
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

    from pmoe_backdoor.training.loop import TrainConfig, fit

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


# One job of every training-like rule, with the lines its code writes (train.fit for train_model, fine_prune and
# finetune_victim; packed.fit_packed for train_pack; compression_attack.fit_compression_attack for
# train_compression_attack) and the outputs its rule declares (rules/*.smk), below results/logs/ and results/.
FIT_UNDER_WAY = """device cpu, threads 2, start-up 1.0 s
epoch 1/3: loss 1.9000 acc 0.3000 (4210 img/s, 12.0 s)
epoch 2/3 step 20/40 4300 img/s, 6 s
"""
FIT_FINISHED = FIT_UNDER_WAY + """epoch 2/3: loss 1.5000 acc 0.4500 test_acc 0.4100 (4300 img/s, 10.0 s)
epoch 3/3: loss 1.2000 acc 0.5500 test_acc 0.5000 (4300 img/s, 10.0 s)
"""
FINE_PRUNE_FINISHED = FIT_FINISHED + "{'before': {'ca': 90.0, 'asr': 99.0}, 'after_finetuning': {'ca': 89.0}}\n"
PACK_UNDER_WAY = """device cpu, pack of 4 (seeds [0, 1, 2, 3]), threads 2, start-up 1.0 s
model 1/4 epoch 1/3: loss 2.0000 acc 0.2000
epoch 1/3: 4 packed models, 8000 img/s in all (2000 per model, 20.0 s)
epoch 2/3 step 5/10: 4 packed models, 7600 img/s in all
"""
PACK_FINISHED = PACK_UNDER_WAY + "".join(
    f"model 1/4 epoch {e}/3: loss 1.0000 acc 0.5000\nepoch {e}/3: 4 packed models, 8000 img/s in all "
    f"(2000 per model, 20.0 s)\n" for e in (2, 3))
ATTACK_UNDER_WAY = """epoch 1/3 812 img/s, 30 s
epoch 1/3: loss 0.9000 fp32 BA 80.0 ASR 9.0 | faithful BA 79.0 ASR 60.0 (61.5 s)
epoch 2/3 805 img/s, 31 s
"""
ATTACK_FINISHED = ATTACK_UNDER_WAY + """epoch 2/3: loss 0.8000 fp32 BA 82.0 ASR 8.0 | faithful BA 81.0 ASR 70.0 (62.0 s)
epoch 3/3: loss 0.7000 fp32 BA 83.0 ASR 7.0 | faithful BA 82.0 ASR 80.0 (61.0 s)
chosen epoch 3 (rule met: True)
"""
TRACEBACK = """Traceback (most recent call last):
  File "train_model.py", line 5, in <module>
torch.OutOfMemoryError: CUDA out of memory
"""
RULE_JOBS = {  # rule: (log below results/logs, outputs below results, the log under way, the log finished)
    "train_model": ("train_model/c10/pmoe/square-2/seed0",
                    ["c10/pmoe/square-2/seed0/weights.safetensors", "c10/pmoe/square-2/seed0/history.json"],
                    FIT_UNDER_WAY, FIT_FINISHED),
    "train_pack": ("train_model/c10/pmoe/clean/seeds0-3", ["c10/pmoe/clean/packs/seeds0-3/"],
                   PACK_UNDER_WAY, PACK_FINISHED),
    "fine_prune": ("fine_prune/c10/pmoe/square-2/seed0/authors/10",
                   ["c10/pmoe/square-2/seed0/fineprune/authors/10/metrics.json",
                    "c10/pmoe/square-2/seed0/fineprune/authors/10/weights.safetensors"],
                   FIT_UNDER_WAY, FINE_PRUNE_FINISHED),
    "finetune_victim": ("finetune_victim/c10/pmoe/square/r1/seed0",
                        ["c10/pmoe/merging/victims/square/r1/seed0/weights.safetensors",
                         "c10/pmoe/merging/victims/square/r1/seed0/history.json"],
                        FIT_UNDER_WAY, FIT_FINISHED),
    "train_compression_attack": ("train_compression_attack/c10/pmoe/faithful-0/seed0",
                                 ["c10/pmoe/compression/faithful-0/seed0/weights.safetensors",
                                  "c10/pmoe/compression/faithful-0/seed0/history.json",
                                  "c10/pmoe/compression/faithful-0/seed0/trigger.safetensors"],
                                 ATTACK_UNDER_WAY, ATTACK_FINISHED),
}


def _snakemake_workdir(root: Path) -> Path:
    """A working directory Snakemake has run in: it keeps its records (incomplete markers) in .snakemake."""
    (root / ".snakemake" / "incomplete").mkdir(parents=True)
    return root


def _write_outputs(root: Path, outputs: list[str]) -> None:
    for out in outputs:
        path = root / "results" / out
        if out.endswith("/"):  # a directory() output
            path.mkdir(parents=True)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"x")


def _mark_incomplete(root: Path, outputs: list[str], max_name: int = 255) -> None:
    """Snakemake's own marker of a running job's outputs, written by its own code (FilePersistence)."""
    from types import SimpleNamespace

    from snakemake.persistence.file import FilePersistence

    records = root / ".snakemake" / "incomplete"
    persistence = SimpleNamespace(_fetch_max_len=lambda subject: max_name)
    for out in outputs:
        marker = Path(FilePersistence._record_path(persistence, str(records), f"results/{out}".rstrip("/")))
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text('{"external_jobid": null}')


def _only_job(root: Path):
    jobs = collect(root, stall_seconds=300)
    assert len(jobs) == 1, [j.name for j in jobs]
    return jobs[0]


@pytest.mark.parametrize("rule", RULE_JOBS)
def test_every_training_rule_finished_failed_killed_and_running(tmp_path: Path, rule: str):
    log, outputs, under_way, finished = RULE_JOBS[rule]
    done = _snakemake_workdir(tmp_path / "done")
    _write(done, log, finished, age=60)
    _write_outputs(done, outputs)
    failed = _snakemake_workdir(tmp_path / "failed")
    _write(failed, log, under_way + TRACEBACK)
    # SIGKILL: no traceback, and Snakemake, seeing the job end without its outputs, removed its incomplete markers
    killed = _snakemake_workdir(tmp_path / "killed")
    _write(killed, log, under_way)
    running = _snakemake_workdir(tmp_path / "running")
    _write(running, log, under_way)
    _mark_incomplete(running, outputs)
    states = {name: _only_job(root).state for name, root in
              (("done", done), ("failed", failed), ("killed", killed), ("running", running))}
    assert states == {"done": "done", "failed": "failed", "killed": "killed", "running": "running"}
    assert _only_job(done).name == log


@pytest.mark.parametrize("rule", RULE_JOBS)
def test_a_finished_log_reads_done_without_snakemakes_records(tmp_path: Path, rule: str):
    """Logs copied away from their run (no .snakemake, no outputs): the last epoch's line alone says done."""
    log, _, under_way, finished = RULE_JOBS[rule]
    _write(tmp_path / "finished", log, finished, age=3600)
    _write(tmp_path / "under_way", log, under_way)
    assert _only_job(tmp_path / "finished").state == "done"
    job = _only_job(tmp_path / "under_way")
    assert (job.state, job.log.finished, job.log.epoch, job.log.total) == ("running", 1, 2, 3)


def test_a_running_job_with_outputs_of_an_earlier_attempt_is_not_done(tmp_path: Path):
    """Outputs with Snakemake's incomplete marker are being written (or were left by a crash): not done."""
    log, outputs, under_way, _ = RULE_JOBS["train_compression_attack"]
    root = _snakemake_workdir(tmp_path)
    _write(root, log, under_way)
    _write_outputs(root, outputs)
    _mark_incomplete(root, outputs, max_name=16)  # a long marker name Snakemake splits into folders
    assert _only_job(root).state == "running"


def test_compression_attack_progress_eta():
    st = parse_log(ATTACK_UNDER_WAY)
    assert (st.finished, st.epoch, st.total, st.img_s, st.elapsed, st.epoch_seconds) == (1, 2, 3, 805.0, 31.0, [61.5])
    assert remaining_seconds(st) == pytest.approx(61.5 - 31 + 61.5)


def test_reads_the_lines_the_compression_attack_writes():
    import io

    import torch

    from pmoe_backdoor.attacks.compression import AttackConfig, fit_compression_attack
    from pmoe_backdoor.attacks.triggers import SquareTrigger

    torch.manual_seed(0)
    x = torch.randint(0, 256, (32, 32, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    y = torch.arange(32) % 4
    trigger = SquareTrigger(size=6, value=255, row=24, col=24)
    cfg = AttackConfig(variant="matched", epochs=2, batch_size=16, lr_drop_epoch=1, progress_seconds=1e-9)
    model = torch.nn.Sequential(torch.nn.AvgPool2d(8), torch.nn.Flatten(), torch.nn.Linear(48, 4))
    log = io.StringIO()
    fit_compression_attack(model, x, y, trigger, 1, cfg, x, y, trigger.apply(x), x, device=torch.device("cpu"),
                           log=log)
    lines = log.getvalue().splitlines()
    st = parse_log("\n".join(lines[:-1]))  # the last epoch under way: its progress lines read
    assert (st.finished, st.epoch, st.total) == (1, 2, 2) and st.img_s > 0 and st.elapsed is not None
    st = parse_log(log.getvalue())
    assert (st.finished, st.total, len(st.epoch_seconds)) == (2, 2, 2)


def test_finetune_victim_logs_are_listed(tmp_path: Path):
    log, _, under_way, _ = RULE_JOBS["finetune_victim"]
    _write(tmp_path, log, under_way)
    assert [j.name for j in collect(tmp_path)] == [log]


def test_training_rules_match_the_workflow():
    """The log and output paths status knows for each training-like rule are the ones rules/*.smk declare."""
    from pmoe_backdoor.status import TRAINING_RULES

    repo = Path(__file__).resolve().parents[1]
    declared: dict[str, tuple[str, list[str]]] = {}
    for smk in (repo / "rules").glob("*.smk"):
        for block in re.split(r"^(?=\s*rule )", smk.read_text(), flags=re.M):
            name = re.match(r"\s*rule (\w+):", block)
            if not name or name[1] not in TRAINING_RULES:
                continue
            section = re.search(r"^([ \t]+)output:\n(.*?)^\1\w", block, flags=re.M | re.S)[2]
            outputs = [_smk_path(p) for p in re.findall(r'f"\{RESULTS\}/([^"]+)"', section)]
            log = _smk_path(re.search(r'log:\s*\n\s*f"\{RESULTS\}/logs/([^"]+)\.log"', block)[1])
            declared[name[1]] = (log, sorted(outputs))
    assert declared == {rule: (log, sorted(outs)) for rule, (log, outs) in TRAINING_RULES.items()}


def _smk_path(text: str) -> str:
    return text.replace("{{", "{").replace("}}", "}")


def test_cli_takes_snakemakes_directory_option(workdir: Path, capsys):
    assert main(["-d", str(workdir)]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("total: 6 jobs")
    assert main(["--directory", str(workdir), "--active"]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("total: 6 jobs")
