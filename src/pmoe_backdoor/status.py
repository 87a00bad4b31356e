"""Watch a run: one line per training job from its log (epoch, speed, ETA, state), and a total.

    pmoe-status [WORKDIR]            (or: python -m pmoe_backdoor.status; WORKDIR is snakemake's -d, default .)
    pmoe-status -d WORKDIR           (the same, in snakemake's spelling)
    pmoe-status --active --watch 30  (only the jobs not done, refreshed every 30 s)

It reads the logs of the training-like jobs (the rules of :data:`TRAINING_RULES`: ``results/logs/train_model/``,
``fine_prune/``, ``finetune_victim/``, ``train_compression_attack/``, and any other ``results/logs/train*/``),
which the one training loop (:mod:`pmoe_backdoor.training.engine`) writes as it goes: a progress line every
``progress_seconds`` (``epoch 3/200 step 40/391 1234 img/s, 12 s``) and one at each epoch's end (``epoch 3/200:
loss ... (1234 img/s, 31.6 s)``); logs written before it (the compression attack's without step counter or speed,
packed training's "in all") still read. A job that has not started yet has no log, so it is not listed. Whether
a job is done, or died without a word, comes from its outputs and Snakemake's records of the jobs it runs (see
:func:`job_state`). Reading a log is :mod:`pmoe_backdoor.status_logs`'s.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from base64 import urlsafe_b64decode
from dataclasses import dataclass
from pathlib import Path

from .status_logs import EPOCH_END, PROGRESS, LogState, epoch_estimate, epoch_fraction, parse_log, remaining_seconds

__all__ = ["EPOCH_END", "LOG_PATTERNS", "NUMBER_WILDCARDS", "PROGRESS", "STATES", "TRAINING_RULES", "Job", "LogState",
           "collect", "duration", "epoch_estimate", "epoch_fraction", "find_logs", "incomplete_outputs", "job_outputs",
           "job_row", "job_state", "main", "parse_log", "remaining_seconds", "render", "total_line"]

STATES = ("done", "failed", "killed", "stalled", "starting", "running")  # the listing's order: the active jobs last

# The training-like rules of rules/*.smk: each one's log below results/logs/ (without .log) and its outputs below
# results/, in the rules' own wildcard syntax (tests/test_status.py checks them against the rules). A log's path
# thus names its job's outputs, which tell a finished job from one that died (job_state).
TRAINING_RULES: dict[str, tuple[str, tuple[str, ...]]] = {
    "train_model": ("train_model/{dataset}/{model}/{attack}/seed{seed}",
                    ("{dataset}/{model}/{attack}/seed{seed}/weights.safetensors",
                     "{dataset}/{model}/{attack}/seed{seed}/history.json")),
    "train_pack": ("train_model/{dataset}/{model}/{attack}/seeds{first}-{last}",
                   ("{dataset}/{model}/{attack}/packs/seeds{first}-{last}",)),
    "fine_prune": ("fine_prune/{dataset}/{model}/{attack}/seed{seed}/{variant}/{prune}",
                   ("{dataset}/{model}/{attack}/seed{seed}/fineprune/{variant}/{prune}/metrics.json",
                    "{dataset}/{model}/{attack}/seed{seed}/fineprune/{variant}/{prune}/weights.safetensors")),
    "finetune_victim": ("finetune_victim/{dataset}/{model}/{victim}/r{replica}/seed{seed}",
                        ("{dataset}/{model}/merging/victims/{victim}/r{replica}/seed{seed}/weights.safetensors",
                         "{dataset}/{model}/merging/victims/{victim}/r{replica}/seed{seed}/history.json")),
    "train_compression_attack": ("train_compression_attack/{dataset}/{model}/{attack}/seed{seed}",
                                 ("{dataset}/{model}/compression/{attack}/seed{seed}/weights.safetensors",
                                  "{dataset}/{model}/compression/{attack}/seed{seed}/history.json",
                                  "{dataset}/{model}/compression/{attack}/seed{seed}/trigger.safetensors")),
}
NUMBER_WILDCARDS = {"seed", "first", "last", "replica"}  # digits only, as rules/common.smk constrains them


def _wildcard_regex(pattern: str) -> re.Pattern[str]:
    parts = re.split(r"\{(\w+)\}", pattern)  # literal, name, literal, name, ...
    return re.compile("".join(re.escape(part) if i % 2 == 0 else
                              f"(?P<{part}>{'[0-9]+' if part in NUMBER_WILDCARDS else '[^/]+'})"
                              for i, part in enumerate(parts)))


LOG_PATTERNS = [(_wildcard_regex(log), outputs) for log, outputs in TRAINING_RULES.values()]


@dataclass
class Job:
    name: str
    log: LogState
    state: str
    quiet: float  # seconds since the log last changed
    eta: float | None


def job_state(st: LogState, quiet: float, stall_seconds: float, outputs_exist: bool | None = None,
              marked_incomplete: bool | None = None) -> str:
    """failed (a traceback), done (its outputs written, or the last epoch finished), killed (it died without a
    traceback), stalled (the log quiet for longer than ``stall_seconds`` and than two epochs), starting (no epoch
    line yet), else running.

    ``outputs_exist``: whether all the job's outputs exist; ``marked_incomplete``: whether Snakemake marks any of
    them incomplete. Either is None where unknown (a rule :data:`TRAINING_RULES` does not know; a working directory
    without Snakemake's records, e.g. logs copied away or ``--persistence-backend db``).

    Why these signals: a killed process (SIGKILL, the OOM killer, a scheduler's time limit, a lost node) writes
    nothing, so its log just stops, like the log of a job between two progress lines. But Snakemake deletes a
    job's outputs and log before running it, marks the outputs incomplete (.snakemake/incomplete/) as the job
    starts, and removes the marks once it has seen the job end: after a success, and after a failure, when it also
    deletes the outputs (a retry marks them again). So a job whose outputs are unmarked is no longer running, and
    without its outputs it failed; no traceback means it was killed. The marks are the bookkeeping behind
    ``--rerun-incomplete``, kept by the main Snakemake process under every executor, unlike the wording of its run
    log, and need no look at processes (which on a cluster run elsewhere). Outputs alone do not mean done while
    marked: the job may still be writing them. The jobs write each output atomically at their end, so all exist
    only after a success, even under ``--keep-incomplete``. A job whose Snakemake was itself killed keeps its
    marks: it reads running until its log has been quiet too long (stalled)."""
    if st.failed:
        return "failed"
    if outputs_exist and not marked_incomplete:  # Snakemake deletes a job's outputs before running it
        return "done"
    if marked_incomplete is False and outputs_exist is False:
        return "killed"
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
    known = {log.split("/", 1)[0] for log, _ in TRAINING_RULES.values()}
    kinds = [d for d in sorted(logs.iterdir()) if d.is_dir() and (d.name in known or d.name.startswith("train"))]
    return [p for d in kinds for p in sorted(d.rglob("*.log"))]


def job_outputs(name: str) -> list[str] | None:
    """The outputs (paths below results/) of the job that writes log ``name`` (below results/logs/, without .log);
    None for a log no rule of :data:`TRAINING_RULES` writes."""
    for pattern, outputs in LOG_PATTERNS:
        if m := pattern.fullmatch(name):
            return [out.format(**m.groupdict()) for out in outputs]
    return None


def incomplete_outputs(workdir: Path) -> set[str] | None:
    """The outputs Snakemake marks incomplete in ``workdir`` (paths as its rules give them, relative to
    ``workdir``), or None where it keeps no such records. Each mark is a file named by the output's path in
    URL-safe base64, split into folders of names starting with '@' where longer than a file name may be
    (snakemake.persistence.file)."""
    records = workdir / ".snakemake" / "incomplete"
    if not records.is_dir():
        return None
    base = workdir.resolve()
    marked = set()
    for folder, _, names in os.walk(records):
        for name in names:
            parts = Path(folder, name).relative_to(records).parts
            try:
                path = urlsafe_b64decode("".join(p.removeprefix("@") for p in parts)).decode()
            except ValueError:  # not a mark (Snakemake's "migration_underway" flag)
                continue
            if os.path.isabs(path) and Path(path).is_relative_to(base):
                path = str(Path(path).relative_to(base))
            marked.add(os.path.normpath(path))
    return marked


def collect(workdir: Path, stall_seconds: float = 300.0, now: float | None = None) -> list[Job]:
    now = time.time() if now is None else now
    marked = incomplete_outputs(workdir)
    jobs = []
    for path in find_logs(workdir):
        try:
            text, mtime = path.read_text(errors="replace"), path.stat().st_mtime
        except OSError:  # removed or rewritten while we looked
            continue
        st = parse_log(text)
        quiet = max(now - mtime, 0.0)
        name = path.relative_to(workdir / "results" / "logs").with_suffix("").as_posix()
        outputs = job_outputs(name)
        outputs_exist = marked_incomplete = None
        if outputs is not None:
            outputs_exist = all((workdir / "results" / out).exists() for out in outputs)
            if marked is not None:
                marked_incomplete = any(os.path.normpath(f"results/{out}") in marked for out in outputs)
        state = job_state(st, quiet, stall_seconds, outputs_exist, marked_incomplete)
        left = remaining_seconds(st) if state == "running" else None
        eta = max(left - quiet, 0.0) if left is not None else None
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
        fraction = epoch_fraction(st)
        epoch = f"{st.epoch}/{st.total}" + (f" ({100 * fraction:.0f}%)" if fraction is not None else "")
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
    ap = argparse.ArgumentParser(prog="pmoe-status", description="Progress of the training-like jobs (training, "
                                 "Fine-Pruning, victims' fine-tuning, compression attacks) of a run, from their logs "
                                 "under WORKDIR/results/logs.")
    ap.add_argument("workdir", nargs="?", help="the run's working directory (snakemake -d; default .)")
    ap.add_argument("-d", "--directory", metavar="WORKDIR", help="the same, in snakemake's spelling")
    ap.add_argument("--stall", type=float, default=300.0, metavar="SECONDS",
                    help="call a job stalled when its log has not changed for this long (and for two epochs); "
                         "default 300")
    ap.add_argument("--active", action="store_true", help="list only the jobs that are not done")
    ap.add_argument("--watch", type=float, default=0.0, metavar="SECONDS", help="refresh every SECONDS until Ctrl-C")
    args = ap.parse_args(argv)
    if args.workdir and args.directory and Path(args.workdir).resolve() != Path(args.directory).resolve():
        ap.error(f"two working directories: {args.workdir} and -d {args.directory}")
    workdir = Path(args.directory or args.workdir or ".")
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
