"""The opening of every workflow script: ``with job_context(snakemake) as job:`` sends the job's output to its log,
gives torch the rule's threads, claims a GPU slot for a rule that asked Snakemake for a GPU, and hands the job its
named input, output, params and wildcards, the device to compute on and, for a per-run rule, its :class:`RunId`."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator

from ..runtime import claim_device, log_to, set_threads
from .common import RunId

RUN_WILDCARDS = ("dataset", "model", "attack", "seed")


@dataclass(frozen=True)
class JobContext:
    """What a workflow script gives its job: Snakemake's named lists as they are, and the device and run."""

    rule: str
    input: Any
    output: Any
    params: Any
    wildcards: Any
    device: str

    @property
    def run(self) -> RunId:
        """The trained model a per-run rule's result belongs to, from its dataset/model/attack/seed wildcards."""
        missing = [name for name in RUN_WILDCARDS if name not in self.wildcards.keys()]
        if missing:
            raise ValueError(f"rule {self.rule}: no run id without the wildcards {missing}")
        w = self.wildcards
        return RunId(w.dataset, w.model, w.attack, int(w.seed))


@contextlib.contextmanager
def job_device(smk: Any) -> Iterator[str]:
    """The device of a job, held for the whole job. A rule with the ``gpu`` resource (``**GPU_JOB`` in
    rules/common.smk) was counted by Snakemake as taking one GPU, so the job claims one slot of one GPU
    (runtime.claim_device; under a scheduler, the GPU it was given). Any other rule was counted as a CPU job: it
    computes on the CPU, else several such jobs would all land on the first GPU unseen."""
    if not smk.resources.get("gpu"):
        yield "cpu"
        return
    absent = [name for name in ("device", "jobs_per_gpu") if name not in smk.params.keys()]
    if absent:
        raise ValueError(f"rule {smk.rule} asks for a GPU but passes no params {absent} (device=DEVICE, "
                         f"jobs_per_gpu=JOBS_PER_GPU)")
    with claim_device(smk.params.device, jobs_per_gpu=smk.params.jobs_per_gpu) as device:
        yield device


@contextlib.contextmanager
def job_context(smk: Any) -> Iterator[JobContext]:
    """Everything a workflow script sets up before its job runs, from the script's ``snakemake`` object."""
    with log_to(smk.log[0] if smk.log else None):
        set_threads(smk.threads)
        with job_device(smk) as device:
            yield JobContext(smk.rule, smk.input, smk.output, smk.params, smk.wildcards, device)
