"""The generic defense job behind the ``defend`` rule: one registered defense (``pmoe_backdoor.defenses``) on one
model as deployed at one precision; its summary (the registry's decision fields beside everything the defense
measured) and its artifacts (tensors such as Neural Cleanse's reversed masks; an empty file for the others)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from ..defenses import DEFENSES, DefenseContext, schema_defaults
from ..deployment.quantize import quantize_model
from ..io import save_tensors, write_json
from ..naming import CLEAN
from .common import JobData, RunId
from .deploy import calibration_images
from .train import training_set


@dataclass(frozen=True)
class DefenseJob:
    """One defense application: which defense, on which model file of which run, at which precision."""

    defense: str
    data: str
    weights: str
    precision: str
    run: RunId
    config: dict[str, Any]
    calibration: int  # clean training images the int8 deployer calibrates on (as deploy_eval)
    target: int  # the attack's target label
    triggers: dict[str, str] = field(default_factory=dict)
    poison: str | None = None


def defense_job(spec: DefenseJob, summary_out: str, artifacts_out: str, device: str = "auto") -> dict[str, Any]:
    defense = DEFENSES[spec.defense]
    job = JobData.open(spec.data, device)
    calibration = calibration_images(job, spec.calibration, spec.run.seed)

    def load_model():
        return job.load_model(spec.weights)[0]

    def deploy(model):
        return quantize_model(model, spec.precision, calibration)

    config = {**schema_defaults(spec.defense), **spec.config}
    ctx = DefenseContext(job, spec.run, spec.precision, spec.target, config, deploy(load_model()), deploy,
                         load_model, dict(spec.triggers), spec.poison, lambda: training_set(job, spec.poison))
    t0 = time.perf_counter()
    result = defense.load().run(ctx)
    summary = {**spec.run.as_dict(), "defense": defense.title, "defense_name": defense.name, "level": defense.level,
               "precision": spec.precision, "target": spec.target, "seconds": time.perf_counter() - t0,
               "config": dict(spec.config), **result.details, "flagged": bool(result.flagged),
               # a clean model has no target to find
               "target_found": None if spec.run.attack == CLEAN or result.target_found is None
               else bool(result.target_found)}
    save_tensors(artifacts_out, result.artifacts, result.artifacts_metadata)
    write_json(summary_out, summary)
    return summary
