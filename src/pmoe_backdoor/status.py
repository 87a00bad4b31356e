"""Watch a run: one line per training job from its log (epoch, speed, ETA, state), and a total.

    pmoe-status [WORKDIR]            (or: python -m pmoe_backdoor.status; WORKDIR is snakemake's -d, default .)
    pmoe-status --active --watch 30  (only the jobs not done, refreshed every 30 s)

It reads the logs of the training jobs (``results/logs/train_model/**.log``, ``results/logs/fine_prune/**.log``
and any other ``results/logs/train*/``), which ``fit`` writes as it goes: a progress line every
``train.progress_seconds`` (``epoch 3/200 step 40/391 1234 img/s, 12 s``) and one at each epoch's end
(``epoch 3/200: loss ... (1234 img/s, 31.6 s)``). A job that has not started yet has no log, so it is not listed.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

PROGRESS = re.compile(r"^epoch (\d+)/(\d+) step (\d+)/(\d+)\b.*?([\d.]+) img/s(?:, ([\d.]+) s\b)?")
EPOCH_END = re.compile(r"^epoch (\d+)/(\d+):.*?([\d.]+) img/s.*?([\d.]+) s\)\s*$")
STATES = ("done", "failed", "stalled", "starting", "running")  # the listing's order: the active jobs last


@dataclass
class LogState:
    """What a training log says: the epochs finished (their seconds), the latest progress and any traceback."""

    total: int = 0
    finished: int = 0
    epoch_seconds: list[float] = field(default_factory=list)
    img_s: float | None = None
    epoch: int = 0  # the epoch of the latest progress line (finished + 1 while one is under way)
    fraction: float = 0.0  # of that epoch, from its step counter
    elapsed: float | None = None  # seconds into that epoch (when the line says it)
    failed: bool = False


def parse_log(text: str) -> LogState:
    """Read a log line by line; lines of other shapes (notes, tracebacks' bodies, packed models' rows) are
    skipped, and a later epoch line always supersedes an earlier one."""
    st = LogState()
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("Traceback (most recent call last)"):
            st.failed = True
        elif m := EPOCH_END.match(line):
            e, n, rate, secs = int(m[1]), int(m[2]), float(m[3]), float(m[4])
            if e == 1 and st.finished:  # a second fit in the same log (it starts over)
                st.epoch_seconds = []
            st.total, st.finished, st.img_s, st.epoch, st.fraction, st.elapsed = n, e, rate, e, 1.0, None
            st.epoch_seconds.append(secs)
        elif m := PROGRESS.match(line):
            e, n, step, steps = int(m[1]), int(m[2]), int(m[3]), int(m[4])
            st.total, st.epoch, st.img_s = n, e, float(m[5])
            st.fraction = step / steps if steps else 0.0
            st.elapsed = float(m[6]) if m[6] else None
            if e <= st.finished:  # a new fit (e.g. a retry in the same log) started over
                st.finished, st.epoch_seconds = e - 1, []
    return st


def epoch_estimate(st: LogState) -> float | None:
    """Seconds per epoch: the mean of the last three finished epochs, else extrapolated from the progress."""
    if st.epoch_seconds:
        recent = st.epoch_seconds[-3:]
        return sum(recent) / len(recent)
    if st.elapsed and st.fraction > 0:
        return st.elapsed / st.fraction
    return None


def remaining_seconds(st: LogState) -> float | None:
    """Seconds still to train when the latest line was written (evaluation passes not counted)."""
    per_epoch = epoch_estimate(st)
    if per_epoch is None or not st.total:
        return None
    if st.epoch > st.finished:  # an epoch under way
        current = per_epoch - st.elapsed if st.elapsed is not None else (1 - st.fraction) * per_epoch
        return max(current, 0.0) + (st.total - st.epoch) * per_epoch
    return (st.total - st.finished) * per_epoch


@dataclass
class Job:
    name: str
    log: LogState
    state: str
    quiet: float  # seconds since the log last changed
    eta: float | None


def job_state(st: LogState, quiet: float, stall_seconds: float) -> str:
    """failed (a traceback), done (the last epoch finished), stalled (the log quiet for longer than
    ``stall_seconds`` and than two epochs), starting (no epoch line yet), else running."""
    if st.failed:
        return "failed"
    if st.total and st.finished >= st.total:
        return "done"
    per_epoch = epoch_estimate(st) or 0.0
    if quiet > max(stall_seconds, 2 * per_epoch):
        return "stalled"
    return "running" if st.total else "starting"


def find_logs(workdir: Path) -> list[Path]:
    logs = workdir / "results" / "logs"
    if not logs.is_dir():
        return []
    kinds = [d for d in sorted(logs.iterdir()) if d.is_dir() and (d.name == "fine_prune" or d.name.startswith("train"))]
    return [p for d in kinds for p in sorted(d.rglob("*.log"))]


def collect(workdir: Path, stall_seconds: float = 300.0, now: float | None = None) -> list[Job]:
    now = time.time() if now is None else now
    jobs = []
    for path in find_logs(workdir):
        try:
            text, mtime = path.read_text(errors="replace"), path.stat().st_mtime
        except OSError:  # removed or rewritten while we looked
            continue
        st = parse_log(text)
        quiet = max(now - mtime, 0.0)
        state = job_state(st, quiet, stall_seconds)
        left = remaining_seconds(st) if state == "running" else None
        eta = max(left - quiet, 0.0) if left is not None else None
        name = path.relative_to(workdir / "results" / "logs").with_suffix("").as_posix()
        jobs.append(Job(name, st, state, quiet, eta))
    return sorted(jobs, key=lambda j: (STATES.index(j.state), j.name))


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def job_row(job: Job) -> list[str]:
    st = job.log
    epoch = f"{st.finished}/{st.total}" if st.total else "-"
    if job.state == "running" and st.epoch > st.finished:
        epoch = f"{st.epoch}/{st.total} ({100 * st.fraction:.0f}%)"
    eta = duration(job.eta) if job.state == "running" else "-"
    speed = f"{st.img_s:.0f}" if st.img_s is not None else "-"
    return [job.name, epoch, speed, eta, job.state, f"{duration(job.quiet)} ago"]


def total_line(jobs: list[Job]) -> str:
    counts = {s: sum(j.state == s for j in jobs) for s in STATES}
    states = ", ".join(f"{counts[s]} {s}" for s in reversed(STATES) if counts[s] or s in ("running", "done"))
    epochs = sum(j.log.finished for j in jobs), sum(j.log.total for j in jobs)
    running = [j for j in jobs if j.state == "running"]
    speed = sum(j.log.img_s or 0.0 for j in running)
    etas = [j.eta for j in running]
    eta = duration(max(etas)) if etas and None not in etas else ("?" if etas else "-")
    return f"total: {len(jobs)} jobs ({states}); epochs {epochs[0]}/{epochs[1]}; {speed:.0f} img/s; ETA {eta}"


def render(jobs: list[Job], everything: list[Job] | None = None) -> str:
    """The table of ``jobs`` and the total line over ``everything`` (default: the same jobs)."""
    header = ["job", "epoch", "img/s", "ETA", "state", "log updated"]
    rows = [header] + [job_row(j) for j in jobs]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    right = {2, 3}
    lines = ["  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
             for r in rows]
    return "\n".join(lines + [total_line(jobs if everything is None else everything)])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="pmoe-status", description="Progress of the training and Fine-Pruning jobs "
                                 "of a run, from their logs under WORKDIR/results/logs.")
    ap.add_argument("workdir", nargs="?", default=".", help="the run's working directory (snakemake -d; default .)")
    ap.add_argument("--stall", type=float, default=300.0, metavar="SECONDS",
                    help="call a job stalled when its log has not changed for this long (and for two epochs); "
                         "default 300")
    ap.add_argument("--active", action="store_true", help="list only the jobs that are not done")
    ap.add_argument("--watch", type=float, default=0.0, metavar="SECONDS", help="refresh every SECONDS until Ctrl-C")
    args = ap.parse_args(argv)
    workdir = Path(args.workdir)
    if not (workdir / "results" / "logs").is_dir():
        print(f"pmoe-status: no {workdir / 'results' / 'logs'}: no job has started in {workdir}", file=sys.stderr)
        return 1
    try:
        while True:
            jobs = collect(workdir, args.stall)
            text = render([j for j in jobs if j.state != "done"] if args.active else jobs, jobs)
            if args.watch:
                print("\033[H\033[2J" + time.strftime("%H:%M:%S ") + str(workdir.resolve()), flush=True)
            print(text, flush=True)
            if not args.watch:
                return 0
            time.sleep(args.watch)
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
