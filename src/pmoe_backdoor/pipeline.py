"""One function per workflow job, taking plain paths and config blocks.

``workflow/scripts/*.py`` are thin wrappers around these; they can be called (and are tested) without
Snakemake. Every output is written atomically.
"""

from __future__ import annotations

import contextlib
import copy
import os
import sys
import time
import traceback
import zlib
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from . import data as data_mod
from .evaluate import evaluate
from .fineprune import channels_to_prune, expert_channel_means, prune_experts, remove_masks
from .io import load_tensors, save_tensors, write_json
from .models import build_model
from .poison import PoisonRecord, asr_set, make_poison
from .train import Probe, TrainConfig, fit, resolve_device, seed_everything
from .triggers import load_trigger, make_trigger


def derived_seed(seed: int, tag: str) -> int:
    """An independent stream per purpose: the same run seed gives unrelated seeds for 'poison', 'warp', ..."""
    return int(np.random.SeedSequence([int(seed), zlib.crc32(tag.encode())]).generate_state(1)[0])


@contextlib.contextmanager
def log_to(path: str | os.PathLike | None) -> Iterator[None]:
    """Send stdout and stderr of a job to its log file (Snakemake's ``log:``)."""
    if not path:
        yield
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh, contextlib.redirect_stdout(fh), contextlib.redirect_stderr(fh):
        try:
            yield
        except BaseException:
            traceback.print_exc(file=fh)  # the log says why the job failed
            raise


@contextlib.contextmanager
def claim_device(device: str = "auto", lock_dir: str | os.PathLike = ".gpu_locks") -> Iterator[str]:
    """Give concurrent jobs distinct GPUs: Snakemake counts ``gpu`` resources but assigns no ids (its
    issue 281), so each job takes an exclusive lock on one device id and trains there. Without CUDA (or
    with an explicit device) the device is returned unchanged."""
    if device != "auto" or not torch.cuda.is_available():
        yield device
        return
    import fcntl

    Path(lock_dir).mkdir(parents=True, exist_ok=True)
    count = torch.cuda.device_count()
    while True:
        for i in range(count):
            fh = open(Path(lock_dir) / f"cuda{i}.lock", "w")
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                fh.close()
                continue
            try:
                print(f"claimed cuda:{i} (of {count})")
                yield f"cuda:{i}"
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)
                fh.close()
            return
        time.sleep(5)  # more jobs than GPUs (e.g. --resources gpu exceeds the real count): wait for one


def set_threads(threads: int | None) -> None:
    if threads:
        torch.set_num_threads(int(threads))


# ----- data -------------------------------------------------------------------------------------------------

def prepare_data(spec: dict[str, Any], out: str) -> None:
    ds = data_mod.load_source(spec)
    print(f"prepared {ds.meta.get('source')}: {len(ds.y_train)} train / {len(ds.y_test)} test, "
          f"{ds.num_classes} classes")
    ds.save(out)


def load_dataset_tensors(path: str) -> tuple[data_mod.Dataset, dict[str, torch.Tensor]]:
    ds = data_mod.load_npz(path)
    t = {k: torch.from_numpy(getattr(ds, k)) for k in ("x_train", "y_train", "x_test", "y_test")}
    return ds, t


# ----- attack -----------------------------------------------------------------------------------------------

def make_trigger_file(kind: str, params: dict[str, Any], seed: int, out: str) -> None:
    trig = make_trigger(kind, params, seed=seed)
    trig.save(out)
    print(f"trigger {kind} {trig.params()}")


def make_poison_file(data_path: str, trigger_path: str, rate_percent: float, seed: int, target: int,
                     exclude_target: bool, out: str) -> None:
    ds = data_mod.load_npz(data_path)
    if not 0 <= target < ds.num_classes:
        raise ValueError(f"attack.target {target} is not a class of {data_path} ({ds.num_classes} classes)")
    rec = make_poison(ds.x_train, ds.y_train, load_trigger(trigger_path), rate_percent,
                      derived_seed(seed, "poison"), target, exclude_target)
    rec.save(out)
    print(f"poisoned {len(rec.indices)} of {len(ds.y_train)} training images ({rate_percent} %), target {target}")


# ----- models -----------------------------------------------------------------------------------------------

def model_from_spec(spec: dict[str, Any], num_classes: int) -> torch.nn.Module:
    spec = dict(spec)
    arch = spec.pop("arch")
    return build_model(arch, num_classes, **spec)


def save_model(model: torch.nn.Module, spec: dict[str, Any], num_classes: int, path: str,
               extra: dict[str, Any] | None = None) -> None:
    state = {k: v for k, v in model.state_dict().items()}
    save_tensors(path, state, {"model": spec, "num_classes": num_classes, **(extra or {})})


def load_model(path: str, device: torch.device | str = "cpu") -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild a model from a safetensors file written by :func:`save_model` (no pickle)."""
    state, meta = load_tensors(path)
    if "model" not in meta or "num_classes" not in meta:
        raise ValueError(f"{path}: not a pmoe-backdoor model file (metadata lacks 'model' / 'num_classes')")
    model = model_from_spec(meta["model"], meta["num_classes"])
    model.load_state_dict(state)
    return model.to(device), meta


def probe_for(ds: data_mod.Dataset, x_test: torch.Tensor, count: int, trigger=None) -> Probe | None:
    """The first test image of each of the first ``count`` classes (and its triggered copy for attacks)."""
    if count <= 0:
        return None
    idx, names = [], []
    for c in range(min(count, ds.num_classes)):
        hits = np.flatnonzero(ds.y_test == c)
        if len(hits):
            idx.append(int(hits[0]))
            names.append(f"test[{hits[0]}] {ds.classes[c]}")
    images = x_test[torch.tensor(idx)]
    if trigger is not None:
        images = torch.cat([images, trigger.apply(images)])
        names = names + [f"{n} +{trigger.kind}" for n in names]
    return Probe(images, names)


def train_job(data_path: str, model_spec: dict[str, Any], train_cfg: dict[str, Any], seed: int, out_weights: str,
              out_history: str, poison_path: str | None = None, trigger_path: str | None = None,
              device: str = "auto", probes: int = 4) -> None:
    t_start = time.perf_counter()
    ds, t = load_dataset_tensors(data_path)
    x_train, y_train = t["x_train"], t["y_train"]
    trigger = None
    if poison_path:
        rec = PoisonRecord.load(poison_path)
        x_train, y_train = rec.apply(x_train, y_train)
        print(f"training set poisoned at {len(rec.indices)} indices, target {rec.target}")
    if trigger_path:
        trigger = load_trigger(trigger_path)
    cfg = TrainConfig.from_dict(dict(train_cfg, seed=derived_seed(seed, "shuffle")))
    seed_everything(derived_seed(seed, "init"))
    model = model_from_spec(model_spec, ds.num_classes)
    dev = resolve_device(device)
    print(f"device {dev}, threads {torch.get_num_threads()}, start-up {time.perf_counter() - t_start:.1f} s")
    history = fit(model, x_train, y_train, cfg, t["x_test"], t["y_test"],
                  probe=probe_for(ds, t["x_test"], probes, trigger), device=dev, log=sys.stderr)
    history["seed"] = seed
    history["wall_seconds"] = time.perf_counter() - t_start
    save_model(model, model_spec, ds.num_classes, out_weights, {"seed": seed})
    write_json(out_history, history)


def evaluate_job(data_path: str, weights: str, out: str, trigger_path: str | None = None, target: int = 0,
                 batch_size: int = 1000, device: str = "auto", info: dict[str, Any] | None = None) -> dict:
    ds, t = load_dataset_tensors(data_path)
    dev = resolve_device(device)
    model, meta = load_model(weights, dev)
    x_asr = asr_set(t["x_test"], t["y_test"], load_trigger(trigger_path), target)[0] if trigger_path else None
    metrics = evaluate(model, t["x_test"], t["y_test"], x_asr, target, ds.num_classes, batch_size, device=dev)
    metrics = {**(info or {}), **metrics, "classes": [str(c) for c in ds.classes]}
    write_json(out, metrics)
    print({k: metrics[k] for k in ("ba", "asr") if k in metrics})
    return metrics


# ----- defenses ---------------------------------------------------------------------------------------------

FINETUNE_DATA = ("authors", "clean")


def fineprune_data(t: dict[str, torch.Tensor], rec: PoisonRecord, trigger_kind: str, finetune_data: str,
                   activation_images: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fine-tuning set and the activation images for ranking.

    ``authors``: the authors' "clean" training array, which for the square trigger still held the triggered
    images with their true labels (in-place side effect, spec 4.1); blend and warp left it clean. ``clean``:
    the clean training set. The activation images are the first ``activation_images`` of that array after a
    seeded shuffle, as the authors' ``training_data[:10000]``.
    """
    if finetune_data not in FINETUNE_DATA:
        raise ValueError(f"fine_pruning.finetune_data must be one of {FINETUNE_DATA}, got {finetune_data!r}")
    if finetune_data == "authors" and trigger_kind == "square":
        x_ft, y_ft = rec.apply(t["x_train"], t["y_train"], relabel=False)
    else:
        x_ft, y_ft = t["x_train"], t["y_train"]
    order = torch.from_numpy(np.random.default_rng(derived_seed(seed, "fp-order")).permutation(len(y_ft)))
    return x_ft, y_ft, x_ft[order[:activation_images]]


def fine_prune_job(data_path: str, weights: str, poison_path: str, trigger_path: str, out: str, out_weights: str,
                   prune_rate: float, finetune_data: str, fp_cfg: dict[str, Any], train_cfg: dict[str, Any],
                   seed: int, target: int = 0, device: str = "auto", info: dict[str, Any] | None = None) -> dict:
    """Prune the experts, fine-tune, and measure CA/ASR before, after pruning and after fine-tuning."""
    ds, t = load_dataset_tensors(data_path)
    dev = resolve_device(device)
    model, meta = load_model(weights, dev)
    rec = PoisonRecord.load(poison_path)
    trigger = load_trigger(trigger_path)
    x_asr = asr_set(t["x_test"], t["y_test"], trigger, target)[0]
    x_ft, y_ft, x_act = fineprune_data(t, rec, trigger.kind, finetune_data,
                                       int(fp_cfg.get("activation_images", 10000)), seed)

    def measure() -> dict[str, float]:
        m = evaluate(model, t["x_test"], t["y_test"], x_asr, target, ds.num_classes, device=dev)
        return {"ca": m["ba"], "asr": m["asr"]}

    result: dict[str, Any] = {**(info or {}), "prune_rate": prune_rate, "finetune_data": finetune_data,
                              "mask": bool(fp_cfg.get("mask", False))}
    result["before"] = measure()
    pruned = channels_to_prune(expert_channel_means(model, x_act, device=dev), prune_rate)
    prune_experts(model, pruned, mask=result["mask"])
    result["pruned_channels"] = [p.tolist() for p in pruned]
    result["after_pruning"] = measure()
    ft = dict(train_cfg, epochs=fp_cfg.get("epochs", 5), lr=fp_cfg.get("lr", train_cfg.get("lr", 0.1)),
              seed=derived_seed(seed, "fp-shuffle"), eval_every=0)
    history = fit(model, x_ft, y_ft, TrainConfig.from_dict(ft), t["x_test"], t["y_test"], device=dev)
    remove_masks(model)
    result["after_finetuning"] = measure()
    result["finetune_history"] = history["epochs"]
    save_model(model, meta["model"], ds.num_classes, out_weights, {"seed": seed, "fine_pruned": prune_rate})
    write_json(out, result)
    print({k: result[k] for k in ("before", "after_pruning", "after_finetuning")})
    return result


def prune_sweep_job(data_path: str, weights: str, trigger_path: str, poison_path: str, out: str,
                    rates: list[float], fp_cfg: dict[str, Any], seed: int, target: int = 0,
                    device: str = "auto", info: dict[str, Any] | None = None) -> list[dict]:
    """CA and ASR after pruning alone (no fine-tuning) at each rate in ``rates``."""
    ds, t = load_dataset_tensors(data_path)
    dev = resolve_device(device)
    base, _ = load_model(weights, dev)
    trigger = load_trigger(trigger_path)
    x_asr = asr_set(t["x_test"], t["y_test"], trigger, target)[0]
    _, _, x_act = fineprune_data(t, PoisonRecord.load(poison_path), trigger.kind,
                                 fp_cfg.get("activation_data", "authors"),
                                 int(fp_cfg.get("activation_images", 10000)), seed)
    means = expert_channel_means(base, x_act, device=dev)
    rows = []
    for rate in rates:
        model = copy.deepcopy(base)
        prune_experts(model, channels_to_prune(means, rate))
        m = evaluate(model, t["x_test"], t["y_test"], x_asr, target, ds.num_classes, device=dev)
        rows.append({**(info or {}), "prune_rate": rate, "ca": m["ba"], "asr": m["asr"]})
    write_json(out, rows)
    return rows


# ----- routing analysis -------------------------------------------------------------------------------------

def first_of_classes(y: np.ndarray, classes: list[int], origin: str) -> list[int]:
    """The index of the first test image of each listed class."""
    out = []
    for c in classes:
        hits = np.flatnonzero(y == c)
        if not len(hits):
            raise ValueError(f"{origin}: class {c} has no test image (classes 0..{int(y.max())})")
        out.append(int(hits[0]))
    return out


def routing_stats_job(data_path: str, weights: str, triggers: dict[str, str], out: str, target: int = 0,
                      device: str = "auto", info: dict[str, Any] | None = None) -> dict:
    """For each square trigger: how often its patch reaches the experts, on the triggered non-target test
    images and on the same images without the trigger."""
    from .routing import routing_indices, trigger_patch_stats, trigger_positions

    ds, t = load_dataset_tensors(data_path)
    dev = resolve_device(device)
    model, _ = load_model(weights, dev)
    keep = t["y_test"] != target
    clean_idx = routing_indices(model, t["x_test"][keep], device=dev)
    result: dict[str, Any] = {**(info or {}), "triggers": {}}
    for name, path in triggers.items():
        trig = load_trigger(path)
        positions = trigger_positions(trig)
        trig_idx = routing_indices(model, trig.apply(t["x_test"][keep]), device=dev)
        result["triggers"][name] = {"positions": positions,
                                    "triggered": trigger_patch_stats(trig_idx, positions),
                                    "untriggered": trigger_patch_stats(clean_idx, positions)}
    write_json(out, result)
    print({k: v["triggered"]["reached_fraction"] for k, v in result["triggers"].items()})
    return result


def routing_maps_job(data_path: str, models: dict[str, dict[str, str | None]], classes: list[int], out: str,
                     device: str = "auto") -> dict:
    """Routing of the chosen test images under each model: ``models`` maps a label to {weights, trigger}; a
    model with a trigger sees the triggered image. Stores the images, the (E, 8, 8) maps and patch sums."""
    from .routing import patch_grid, patch_sums, routing_indices

    ds, t = load_dataset_tensors(data_path)
    dev = resolve_device(device)
    picks = first_of_classes(ds.y_test, classes, data_path)
    x = t["x_test"][torch.tensor(picks)]
    rows = []
    for label, spec in models.items():
        model, _ = load_model(spec["weights"], dev)
        images = load_trigger(spec["trigger"]).apply(x) if spec.get("trigger") else x
        idx = routing_indices(model, images, device=dev)
        for i, test_index in enumerate(picks):
            rows.append({"model": label, "test_index": test_index, "class": str(ds.classes[ds.y_test[test_index]]),
                         "triggered": bool(spec.get("trigger")), "image": images[i].tolist(),
                         "maps": patch_grid(idx[i]).tolist(), "patch_sums": patch_sums(images[i]).tolist(),
                         "selected": idx[i].tolist()})
    result = {"dataset": str(Path(data_path).stem), "rows": rows}
    write_json(out, result)
    return result


def trigger_examples_job(data_path: str, triggers: dict[str, str], classes: list[int], out_png: str,
                         title: str) -> None:
    from .figures import trigger_examples_figure

    ds, t = load_dataset_tensors(data_path)
    picks = first_of_classes(ds.y_test, classes, data_path)
    x = t["x_test"][torch.tensor(picks)]
    triggered = {name: load_trigger(path).apply(x).numpy() for name, path in triggers.items()}
    trigger_examples_figure(x.numpy(), [str(ds.classes[ds.y_test[i]]) for i in picks], triggered, out_png, title)


# ----- deployment precisions and Neural Cleanse -------------------------------------------------------------

def calibration_images(x_train: torch.Tensor, count: int, seed: int) -> torch.Tensor:
    """The deployer's calibration set: ``count`` clean training images after a seeded shuffle."""
    order = torch.from_numpy(np.random.default_rng(derived_seed(seed, "calibration")).permutation(len(x_train)))
    return x_train[order[:count]]


def deploy_eval_job(data_path: str, weights: str, precisions: list[str], out: str, trigger_path: str | None = None,
                    calibration: int = 512, target: int = 0, batch_size: int = 1000, device: str = "auto",
                    info: dict[str, Any] | None = None) -> list[dict]:
    """BA and ASR of the model as deployed at each precision; for pmoe models, the share of top-k routing
    positions that differ from the fp32 model on the clean and the triggered test images."""
    from .quantize import quantize_model, routing_change
    from .routing import routing_indices

    ds, t = load_dataset_tensors(data_path)
    dev = resolve_device(device)
    model, _ = load_model(weights, dev)
    seed = int((info or {}).get("seed", 0))
    calib = calibration_images(t["x_train"], calibration, seed)
    x_asr = asr_set(t["x_test"], t["y_test"], load_trigger(trigger_path), target)[0] if trigger_path else None
    is_pmoe = getattr(model, "moe", None) is not None
    if is_pmoe:
        ref_clean = routing_indices(model, t["x_test"], device=dev)
        ref_trig = routing_indices(model, x_asr, device=dev) if x_asr is not None else None
    results = []
    for precision in precisions:
        qmodel = quantize_model(model, precision, calib)
        metrics = evaluate(qmodel, t["x_test"], t["y_test"], x_asr, target, ds.num_classes, batch_size, device=dev)
        result = {**(info or {}), "precision": precision,
                  "calibration_images": calibration if precision == "int8" else 0,
                  **{k: metrics[k] for k in ("ba", "asr", "test_loss") if k in metrics}}
        if is_pmoe:
            result["routing_change_clean"] = routing_change(ref_clean, routing_indices(qmodel, t["x_test"], device=dev))
            if x_asr is not None:
                result["routing_change_triggered"] = routing_change(ref_trig,
                                                                    routing_indices(qmodel, x_asr, device=dev))
        print(result)
        results.append(result)
    write_json(out, results)
    return results


def neural_cleanse_job(data_path: str, weights: str, precision: str, out: str, out_masks: str,
                       nc_cfg: dict[str, Any], classes: int | None = None, images: int = 200, calibration: int = 512,
                       target: int = 0, device: str = "auto", info: dict[str, Any] | None = None) -> dict:
    """Neural Cleanse on the model as deployed at ``precision``, with ``images`` clean test images."""
    from .neural_cleanse import NCConfig, neural_cleanse
    from .quantize import quantize_model

    ds, t = load_dataset_tensors(data_path)
    dev = resolve_device(device)
    model, _ = load_model(weights, dev)
    seed = int((info or {}).get("seed", 0))
    qmodel = quantize_model(model, precision, calibration_images(t["x_train"], calibration, seed))
    order = torch.from_numpy(np.random.default_rng(derived_seed(seed, "nc-images")).permutation(len(t["y_test"])))
    x = t["x_test"][order[:images]]
    class_list = list(range(ds.num_classes if classes is None else min(classes, ds.num_classes)))
    t0 = time.perf_counter()
    summary, masks = neural_cleanse(qmodel, x, class_list, NCConfig.from_dict(nc_cfg), seed=derived_seed(seed, "nc"),
                                    device=dev)
    summary = {**(info or {}), "precision": precision, "target": target, "images": len(x),
               "seconds": time.perf_counter() - t0, **summary,
               "detected_target": summary["flagged"] and summary["flagged_class"] == target}
    save_tensors(out_masks, masks, {"classes": class_list})
    write_json(out, summary)
    print({k: summary[k] for k in ("flagged", "flagged_class", "seconds")})
    return summary
