"""The workflow scripts' opening (jobs/wrapper.py) with a stand-in for Snakemake's ``snakemake`` object: the log,
the threads, a GPU slot exactly for a rule with the gpu resource, the run id; and the job configs read from it."""

from __future__ import annotations

import contextlib
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from pmoe_backdoor.jobs import wrapper
from pmoe_backdoor.jobs.common import RunId
from pmoe_backdoor.jobs.deploy import DeployEvalJob
from pmoe_backdoor.jobs.train import TrainJob
from pmoe_backdoor.jobs.wrapper import job_context

RUN_WILDCARDS = {"dataset": "synth", "model": "pmoe", "attack": "square-10", "seed": "3"}


class Named(list):
    """One of Snakemake's named lists as a script sees it: the items in order, each also an attribute by name."""

    def __init__(self, **named):
        super().__init__(named.values())
        self.__dict__.update(named)
        self._names = list(named)

    def keys(self) -> list[str]:
        return list(self._names)

    def get(self, key: str, default=None):
        return getattr(self, key) if key in self._names else default


def fake_snakemake(tmp_path: Path, resources: dict, params: dict, wildcards: dict = RUN_WILDCARDS,
                   inputs: dict | None = None, outputs: dict | None = None, threads: int = 1) -> SimpleNamespace:
    return SimpleNamespace(rule="some_rule", input=Named(**(inputs or {"data": "d.npz"})),
                           output=Named(**(outputs or {"out": "o.json"})), params=Named(**params),
                           wildcards=Named(**wildcards), threads=threads, resources=Named(**resources),
                           log=[str(tmp_path / "logs" / "job.log")])


@pytest.fixture
def claims(monkeypatch) -> list[tuple[str, int]]:
    """Every GPU claim a job makes, as (device asked for, jobs per GPU); the claim hands out cuda:1."""
    made = []

    @contextlib.contextmanager
    def claim(device: str, jobs_per_gpu: int = 1):
        made.append((device, jobs_per_gpu))
        yield "cuda:1"

    monkeypatch.setattr(wrapper, "claim_device", claim)
    return made


def test_a_gpu_rule_claims_a_slot_for_the_whole_job(tmp_path, claims):
    smk = fake_snakemake(tmp_path, {"gpu": 1, "runtime": 10}, {"device": "auto", "jobs_per_gpu": 2})
    with job_context(smk) as job:
        assert job.device == "cuda:1" and claims == [("auto", 2)]


def test_a_rule_without_the_gpu_resource_computes_on_the_cpu_unclaimed(tmp_path, claims):
    """Snakemake counted it as a CPU job: were it to follow params.device ("auto"), several such jobs would all run
    on the first GPU."""
    smk = fake_snakemake(tmp_path, {"runtime": 30}, {"device": "auto", "jobs_per_gpu": 1})
    with job_context(smk) as job:
        assert job.device == "cpu" and claims == []


def test_a_gpu_rule_without_device_params_is_a_clear_error(tmp_path, claims):
    smk = fake_snakemake(tmp_path, {"gpu": 1}, {"device": "auto"})
    with pytest.raises(ValueError, match=r"rule some_rule asks for a GPU but passes no params \['jobs_per_gpu'\]"):
        with job_context(smk):
            pass
    assert claims == []


def test_the_job_logs_to_its_file_with_the_rule_threads(tmp_path):
    before = torch.get_num_threads()
    threads = 1 if before > 1 else 2
    try:
        with pytest.raises(RuntimeError, match="the job failed"):
            with job_context(fake_snakemake(tmp_path, {}, {}, threads=threads)):
                assert torch.get_num_threads() == threads
                print("the job ran")
                raise RuntimeError("the job failed")
    finally:
        torch.set_num_threads(before)
    log = (tmp_path / "logs" / "job.log").read_text()
    assert "the job ran" in log and "RuntimeError: the job failed" in log  # the log says why it failed


def test_the_run_id_comes_from_the_run_wildcards(tmp_path):
    with job_context(fake_snakemake(tmp_path, {}, {})) as job:
        assert job.run == RunId("synth", "pmoe", "square-10", 3)
    merged_set = {"dataset": "synth", "model": "pmoe", "set": "bs", "seed": "0", "coupling": "free"}
    with job_context(fake_snakemake(tmp_path, {}, {}, wildcards=merged_set)) as job:
        with pytest.raises(ValueError, match=r"rule some_rule: no run id without the wildcards \['attack'\]"):
            _ = job.run


def test_job_configs_read_the_rule_as_the_scripts_did(tmp_path, claims):
    deploy_params = {"precisions": ("fp32", "int8"), "calibration": 16, "target": 0, "batch_size": 32,
                     "device": "cpu", "jobs_per_gpu": 1}
    inputs = {"data": "d.npz", "weights": "w.safetensors", "trigger": ""}
    smk = fake_snakemake(tmp_path, {"gpu": 1}, deploy_params, inputs=inputs)
    with job_context(smk) as job:
        trained = DeployEvalJob.from_context(job)
    assert trained == DeployEvalJob("d.npz", "w.safetensors", ["fp32", "int8"], "o.json", trigger=None,
                                    calibration=16, target=0, batch_size=32, device="cuda:1",
                                    run=RunId("synth", "pmoe", "square-10", 3), fine_pruned=None)
    fine_pruned = dict(RUN_WILDCARDS, variant="authors", prune="30")
    with job_context(fake_snakemake(tmp_path, {"gpu": 1}, deploy_params, fine_pruned, inputs=inputs)) as job:
        assert DeployEvalJob.from_context(job).fine_pruned == "authors 30 %"

    train_params = {"model": {"arch": "pmoe"}, "train": {"epochs": 1}, "probes": 2, "device": "cpu", "jobs_per_gpu": 1}
    smk = fake_snakemake(tmp_path, {"gpu": 1}, train_params, inputs={"data": "d.npz", "poison": "p", "trigger": ""},
                         outputs={"weights": "w", "history": "h"})
    with job_context(smk) as job:
        assert TrainJob.from_context(job) == TrainJob("d.npz", {"arch": "pmoe"}, {"epochs": 1}, 3, "w", "h",
                                                      poison="p", trigger=None, device="cuda:1", probes=2)
