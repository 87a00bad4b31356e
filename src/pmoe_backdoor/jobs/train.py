"""Train stage: one model of one (dataset, model, attack, seed) run, its weights and its training history."""

from __future__ import annotations

import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..attacks.poison import PoisonRecord, asr_set
from ..attacks.router_evasion import EvasionConfig, fit_router_evasive
from ..attacks.triggers import Trigger, load_trigger
from ..io import atomic_path, write_json
from ..models.checkpoint import model_from_spec, save_model
from ..runtime import derived_seed, seed_everything
from ..training.loop import Probe, TrainConfig, fit
from ..training.packed import fit_packed
from .common import JobData
from .wrapper import JobContext


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


def build_run(job: JobData, model_spec: dict[str, Any], train_cfg: dict[str, Any], seed: int,
              poison_path: str | None, trigger_path: str | None, probes: int
              ) -> tuple[torch.nn.Module, tuple[torch.Tensor, torch.Tensor], TrainConfig, Probe | None]:
    """One run's model (initialised from the run seed), training set, training config and probe: the same for a
    run trained alone and for one trained in a pack."""
    data = training_set(job, poison_path)
    trigger = load_trigger(trigger_path) if trigger_path else None
    cfg = TrainConfig.from_dict(dict(train_cfg, seed=derived_seed(seed, "shuffle")))
    seed_everything(derived_seed(seed, "init"))
    return model_from_spec(model_spec, job.num_classes), data, cfg, probe_for(job, probes, trigger)


def save_run(job: JobData, model: torch.nn.Module, model_spec: dict[str, Any], history: dict[str, Any], seed: int,
             wall_seconds: float, out_weights: str, out_history: str) -> None:
    history["seed"] = seed
    history["wall_seconds"] = wall_seconds
    save_model(model, model_spec, job.num_classes, out_weights, {"seed": seed})
    write_json(out_history, history)


@dataclass(frozen=True)
class TrainJob:
    """One run's training: the model spec and recipe, the run seed, the poison record and trigger of an attack (None
    for a clean run), where the weights and history go, and how many probe images the history follows."""

    data: str
    model: dict[str, Any]
    train: dict[str, Any]
    seed: int
    out_weights: str
    out_history: str
    poison: str | None
    trigger: str | None
    device: str
    probes: int

    @classmethod
    def from_context(cls, job: JobContext) -> TrainJob:
        i, p = job.input, job.params
        return cls(i.data, dict(p.model), dict(p.train), int(job.wildcards.seed), job.output.weights,
                   job.output.history, poison=i.poison or None, trigger=i.trigger or None, device=job.device,
                   probes=p.probes)


def train_job(spec: TrainJob) -> None:
    """One run: ``fit``, or for an adaptive attack whose settings carry ``router_evasion`` the same recipe with the
    router-evasion term (:func:`pmoe_backdoor.attacks.router_evasion.fit_router_evasive`)."""
    t_start = time.perf_counter()
    job = JobData.open(spec.data, spec.device)
    train = dict(spec.train)
    evasion = train.pop("router_evasion", None)
    model, (x_train, y_train), cfg, probe = build_run(job, spec.model, train, spec.seed, spec.poison,
                                                      spec.trigger, spec.probes)
    print(f"device {job.device}, threads {torch.get_num_threads()}, start-up {time.perf_counter() - t_start:.1f} s")
    if evasion is None:
        history = fit(model, x_train, y_train, cfg, job.x_test, job.y_test, probe=probe, device=job.device,
                      log=sys.stderr)
    else:
        history = fit_evasive(job, model, (x_train, y_train), cfg, EvasionConfig.from_dict(evasion), probe, spec)
    save_run(job, model, spec.model, history, spec.seed, time.perf_counter() - t_start, spec.out_weights,
             spec.out_history)


def fit_evasive(job: JobData, model: torch.nn.Module, data: tuple[torch.Tensor, torch.Tensor], cfg: TrainConfig,
                evasion: EvasionConfig, probe: Probe | None, spec: TrainJob) -> dict[str, Any]:
    """The router-evasive attack's training; its history also follows ASR and the trigger's routing per epoch."""
    if not spec.poison or not spec.trigger:
        raise ValueError("router_evasion trains an attack: the run needs a poison record and a trigger")
    rec, trigger = PoisonRecord.load(spec.poison), load_trigger(spec.trigger)
    poisoned = torch.zeros(len(data[1]), dtype=torch.bool)
    poisoned[torch.as_tensor(rec.indices, dtype=torch.long)] = True
    x_asr, _ = asr_set(job.x_test, job.y_test, trigger, rec.target)
    return fit_router_evasive(model, *data, poisoned, trigger, cfg, evasion, job.x_test, job.y_test, x_asr,
                              rec.target, probe=probe, device=job.device, log=sys.stderr)


@dataclass(frozen=True)
class TrainPackJob:
    """The runs of several seeds trained as one packed computation: per run (in the order of ``seeds``) its output
    files, poison record and trigger, as :class:`TrainJob` has them for one run."""

    data: str
    model: dict[str, Any]
    train: dict[str, Any]
    seeds: list[int]
    out_weights: list[str]
    out_histories: list[str]
    poisons: list[str | None]
    triggers: list[str | None]
    device: str
    probes: int

    @classmethod
    def from_context(cls, job: JobContext) -> TrainPackJob:
        p = job.params
        seeds = [int(s) for s in p.seeds]
        weights, histories = zip(*(pack_run_files(job.output[0], s) for s in seeds))
        return cls(job.input.data, dict(p.model), dict(p.train), seeds, list(weights), list(histories),
                   list(p.poison), [t or None for t in p.trigger], device=job.device, probes=p.probes)


def train_pack_job(spec: TrainPackJob) -> None:
    """Train the runs of several seeds as one packed computation (``fit_packed``); each run's files are the same
    as :func:`train_job` writes for it, up to float rounding order."""
    seeds = spec.seeds
    if not len(seeds) == len(spec.out_weights) == len(spec.out_histories) == len(spec.poisons) == len(spec.triggers):
        raise ValueError("train_pack_job: seeds, outputs, poison and trigger paths must have one entry per run")
    t_start = time.perf_counter()
    job = JobData.open(spec.data, spec.device)
    runs = [build_run(job, spec.model, spec.train, seed, poison, trigger, spec.probes)
            for seed, poison, trigger in zip(seeds, spec.poisons, spec.triggers)]
    models, datasets, cfgs, run_probes = (list(column) for column in zip(*runs))
    print(f"device {job.device}, pack of {len(seeds)} (seeds {seeds}), threads {torch.get_num_threads()}, "
          f"start-up {time.perf_counter() - t_start:.1f} s")
    histories = fit_packed(models, datasets, cfgs, job.x_test, job.y_test, probes=run_probes, device=job.device,
                           log=sys.stderr)
    wall = time.perf_counter() - t_start
    for model, history, seed, weights, out_history in zip(models, histories, seeds, spec.out_weights,
                                                          spec.out_histories):
        save_run(job, model, spec.model, history, seed, wall, weights, out_history)


def pack_run_files(pack_dir: str, seed: int) -> tuple[str, str]:
    """Where a packed job keeps one run's weights and history inside its folder."""
    return f"{pack_dir}/seed{seed}/weights.safetensors", f"{pack_dir}/seed{seed}/history.json"


def link_run(pack_dir: str, seed: int, out_weights: str, out_history: str) -> None:
    """Put one run of a packed job into its own result folder: a hard link where the file system allows (no copy
    of the weights), else a copy; either appears at once under its final name."""
    for src, dst in zip(pack_run_files(pack_dir, seed), (out_weights, out_history)):
        Path(dst).parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(src, dst)
        except OSError:
            with atomic_path(dst) as tmp:
                shutil.copyfile(src, tmp)
