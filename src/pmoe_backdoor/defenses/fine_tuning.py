"""Fine-tuning, the plain baseline of backdoor removal (BackdoorBench's "FT"): the defender fine-tunes the model on
a small clean share of the training data and deploys the result.

The defender holds the float model, so fine-tuning runs in fp32 and the fine-tuned model is then deployed like the
original (the same precision and calibration images). The backdoor counts as removed when the ASR of the fine-tuned
model as deployed falls below ``removal_asr`` (%), the level the blindspot table applies to Fine-Pruning. A removal
defense: it names no label and is not run on clean models. The clean images are a seeded draw of ``images`` clean
training images (never the poisoned versions); SGD with momentum, no per-epoch evaluation. The defaults are this
project's, sized for the 10k-image subsets (500 images = 5 % of them).
"""

from __future__ import annotations

import numpy as np
import torch

from ..evaluate import evaluate
from ..runtime import derived_seed
from ..training.loop import TrainConfig, fit
from . import DefenseContext, DefenseResult

DEFENSE = {"name": "fine_tuning", "title": "Fine-tuning", "level": "model", "on_clean_models": False}


def run(ctx: DefenseContext) -> DefenseResult:
    cfg, job = ctx.config, ctx.job
    if len(ctx.triggers) != 1:
        raise ValueError(f"fine_tuning: an attacked model's own trigger is needed to measure the ASR, got "
                         f"{sorted(ctx.triggers)}")
    x_asr = job.asr_images(next(iter(ctx.triggers.values())), ctx.target)
    count = min(int(cfg["images"]), len(job.y_train))
    chosen = torch.from_numpy(np.random.default_rng(derived_seed(ctx.run.seed, "ft-clean")).permutation(
        len(job.y_train))[:count])
    batch = int(cfg["eval_batch_size"])
    before = evaluate(ctx.model, job.x_test, job.y_test, x_asr, ctx.target, job.num_classes, batch, device=job.device)
    model = ctx.load_model()
    recipe = TrainConfig.from_dict({k: cfg[k] for k in ("epochs", "lr", "batch_size", "momentum", "weight_decay")}
                                   | {"seed": derived_seed(ctx.run.seed, "ft-shuffle"), "eval_every": 0,
                                      "progress_seconds": 0})
    fit(model, job.x_train[chosen], job.y_train[chosen], recipe, device=job.device, log=None)
    after = evaluate(ctx.deploy(model), job.x_test, job.y_test, x_asr, ctx.target, job.num_classes, batch,
                     device=job.device)
    removed = after["asr"] < float(cfg["removal_asr"])
    print(f"fine-tuned on {count} clean images: BA {before['ba']:.1f} -> {after['ba']:.1f}, "
          f"ASR {before['asr']:.1f} -> {after['asr']:.1f} ({'removed' if removed else 'not removed'})")
    return DefenseResult(removed, details={"images": count, "ba_before": before["ba"], "asr_before": before["asr"],
                                           "ba": after["ba"], "asr": after["asr"], "asr_after": after["asr"]})
