"""Read a training log: the progress and epoch-end lines the training loop writes (see :mod:`pmoe_backdoor.status`
for their shapes), what they say (:class:`LogState`), and the estimates drawn from it (seconds per epoch, how far
the epoch under way is, seconds left)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

# Every training writes the one loop's lines (pmoe_backdoor.training.engine). Logs written before it still read: the
# step counter is optional (the compression attack's progress lines had none), so is the speed at an epoch's end (its
# epoch lines gave the seconds only), and text may stand before the speed (packed: "epoch 2/4 step 5/10: 4 packed
# models, 7600 img/s in all", "epoch 1/4: 4 packed models, 8000 img/s in all (2000 per model, 20.0 s)").
PROGRESS = re.compile(r"^epoch (\d+)/(\d+)(?: step (\d+)/(\d+))?\b.*?([\d.]+) img/s(?:, ([\d.]+) s\b)?")
EPOCH_END = re.compile(r"^epoch (\d+)/(\d+):(?:.*?([\d.]+) img/s)?.*?([\d.]+) s\)\s*$")


@dataclass
class LogState:
    """What a training log says: the epochs finished (their seconds), the latest progress and any traceback."""

    total: int = 0
    finished: int = 0
    epoch_seconds: list[float] = field(default_factory=list)
    img_s: float | None = None
    epoch: int = 0  # the epoch of the latest progress line (finished + 1 while one is under way)
    fraction: float | None = 0.0  # of that epoch, from its step counter (None: the line has no step counter)
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
            e, n, secs = int(m[1]), int(m[2]), float(m[4])
            if e == 1 and st.finished:  # a second fit in the same log (it starts over)
                st.epoch_seconds = []
            st.total, st.finished, st.epoch, st.fraction, st.elapsed = n, e, e, 1.0, None
            st.img_s = float(m[3]) if m[3] else st.img_s  # without a speed of its own, the last progress line's
            st.epoch_seconds.append(secs)
        elif m := PROGRESS.match(line):
            e, n = int(m[1]), int(m[2])
            st.total, st.epoch, st.img_s = n, e, float(m[5])
            st.fraction = (int(m[3]) / int(m[4]) if int(m[4]) else 0.0) if m[3] else None
            st.elapsed = float(m[6]) if m[6] else None
            if e <= st.finished:  # a new fit (e.g. a retry in the same log) started over
                st.finished, st.epoch_seconds = e - 1, []
    return st


def epoch_estimate(st: LogState) -> float | None:
    """Seconds per epoch: the mean of the last three finished epochs, else extrapolated from the progress."""
    if st.epoch_seconds:
        recent = st.epoch_seconds[-3:]
        return sum(recent) / len(recent)
    if st.elapsed and st.fraction:
        return st.elapsed / st.fraction
    return None


def epoch_fraction(st: LogState) -> float | None:
    """How far the epoch under way is: its step counter, else its seconds against an epoch's, else unknown."""
    if st.fraction is not None:
        return st.fraction
    per_epoch = epoch_estimate(st)
    if per_epoch and st.elapsed is not None:
        return min(st.elapsed / per_epoch, 1.0)
    return None


def remaining_seconds(st: LogState) -> float | None:
    """Seconds still to train when the latest line was written (evaluation passes not counted)."""
    per_epoch = epoch_estimate(st)
    if per_epoch is None or not st.total:
        return None
    if st.epoch > st.finished:  # an epoch under way
        current = per_epoch - st.elapsed if st.elapsed is not None else (1 - (st.fraction or 0.0)) * per_epoch
        return max(current, 0.0) + (st.total - st.epoch) * per_epoch
    return (st.total - st.finished) * per_epoch
