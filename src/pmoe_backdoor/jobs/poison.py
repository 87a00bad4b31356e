"""Poison stage: the trigger of a run, and the poisoned training indices with their triggered images."""

from __future__ import annotations

from typing import Any

import torch

from ..attacks import make_trigger, trigger_kind
from ..attacks.poison import PoisonRecord, make_poison
from ..attacks.triggers import load_trigger
from ..data.datasets import load_npz
from ..runtime import derived_seed


def trigger_seed(kind: str, trigger_seed: int, run_seed: int) -> int:
    """A kind drawn anew for every run (the warp grid: the authors drew one per notebook session) draws from the
    run seed; the others are the same for every run, from the config's ``attack.trigger_seed``."""
    if trigger_kind(kind).fresh_per_run:
        return derived_seed(run_seed, "warp")  # the name keeps the seeds of existing runs
    return derived_seed(trigger_seed, "blend")


def make_trigger_file(kind: str, params: dict[str, Any], seed: int, out: str) -> None:
    trig = make_trigger(kind, params, seed=seed)
    trig.save(out)
    print(f"trigger {kind} {trig.params()}")


def clean_record_file(data_path: str, out: str) -> None:
    """A clean run's poison record: no index replaced (target -1: none), so that every training run reads one."""
    ds = load_npz(data_path)
    empty = torch.from_numpy(ds.x_train[:0].copy())
    PoisonRecord(torch.zeros(0, dtype=torch.int64), empty, -1, {"rate_percent": 0.0, "n_train": len(ds.y_train)}
                 ).save(out)
    print(f"clean training set: none of {len(ds.y_train)} training images poisoned")


def make_poison_file(data_path: str, trigger_path: str, rate_percent: float, seed: int, target: int,
                     exclude_target: bool, out: str) -> None:
    ds = load_npz(data_path)
    if not 0 <= target < ds.num_classes:
        raise ValueError(f"attack.target {target} is not a class of {data_path} ({ds.num_classes} classes)")
    rec = make_poison(ds.x_train, ds.y_train, load_trigger(trigger_path), rate_percent,
                      derived_seed(seed, "poison"), target, exclude_target)
    rec.save(out)
    print(f"poisoned {len(rec.indices)} of {len(ds.y_train)} training images ({rate_percent} %), target {target}")
