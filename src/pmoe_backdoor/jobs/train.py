"""Train stage: one model of one (dataset, model, attack, seed) run, its weights and its training history."""

from __future__ import annotations

import sys
import time
from typing import Any

import numpy as np
import torch

from ..checkpoint import model_from_spec, save_model
from ..io import write_json
from ..poison import PoisonRecord
from ..runtime import derived_seed, seed_everything
from ..train import Probe, TrainConfig, fit
from ..triggers import Trigger, load_trigger
from .common import JobData


def probe_for(job: JobData, count: int, trigger: Trigger | None = None) -> Probe | None:
    """The first test image of each of the first ``count`` classes (and its triggered copy for attacks)."""
    if count <= 0:
        return None
    idx, names = [], []
    for c in range(min(count, job.num_classes)):
        hits = np.flatnonzero(job.dataset.y_test == c)
        if len(hits):
            idx.append(int(hits[0]))
            names.append(f"test[{hits[0]}] {job.dataset.classes[c]}")
    images = job.x_test[torch.tensor(idx)]
    if trigger is not None:
        images = torch.cat([images, trigger.apply(images)])
        names = names + [f"{n} +{trigger.kind}" for n in names]
    return Probe(images, names)


def training_set(job: JobData, poison_path: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    if not poison_path:
        return job.x_train, job.y_train
    rec = PoisonRecord.load(poison_path)
    if not len(rec.indices):  # a clean run's record: the clean set itself, not a copy
        print("training set: clean (nothing poisoned)")
        return job.x_train, job.y_train
    print(f"training set poisoned at {len(rec.indices)} indices, target {rec.target}")
    return rec.apply(job.x_train, job.y_train)


def train_job(data_path: str, model_spec: dict[str, Any], train_cfg: dict[str, Any], seed: int, out_weights: str,
              out_history: str, poison_path: str | None, trigger_path: str | None, device: str,
              probes: int) -> None:
    t_start = time.perf_counter()
    job = JobData.open(data_path, device)
    x_train, y_train = training_set(job, poison_path)
    trigger = load_trigger(trigger_path) if trigger_path else None
    cfg = TrainConfig.from_dict(dict(train_cfg, seed=derived_seed(seed, "shuffle")))
    seed_everything(derived_seed(seed, "init"))
    model = model_from_spec(model_spec, job.num_classes)
    print(f"device {job.device}, threads {torch.get_num_threads()}, start-up {time.perf_counter() - t_start:.1f} s")
    history = fit(model, x_train, y_train, cfg, job.x_test, job.y_test, probe=probe_for(job, probes, trigger),
                  device=job.device, log=sys.stderr)
    history["seed"] = seed
    history["wall_seconds"] = time.perf_counter() - t_start
    save_model(model, model_spec, job.num_classes, out_weights, {"seed": seed})
    write_json(out_history, history)
