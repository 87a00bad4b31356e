"""pmoe_backdoor.cpu_estimate: the training-time estimate on a CPU and the warning before a study too long for one,
and (end to end) that the warning reaches the console of a real run but not of a dry run."""

from __future__ import annotations

import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import yaml

from pmoe_backdoor.cpu_estimate import (
    CPU_STUDY_COMMAND,
    TEST_RATE_VARIABLE,
    TrainingWork,
    concurrent_jobs,
    long_cpu_study_warning,
    probe_machine,
    train_images,
    training_work,
    workflow_warning,
)

REPO = Path(__file__).resolve().parents[1]
PAPER = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
SMOKE = yaml.safe_load((REPO / "config" / "smoke.yaml").read_text())


def training_jobs(cfg: dict) -> list[tuple[str, dict[str, str]]]:
    """Every train_model job of a config's grid, as Snakemake's DAG lists them (plus a job of another rule)."""
    attacks = [("clean", cfg["seeds"]["clean"])] + [
        (f"{trigger}-{rate}", cfg["seeds"]["attack"]) for trigger in cfg["attack"]["triggers"]
        for rate in cfg["attack"]["rates"]]
    jobs = [("train_model", {"dataset": d, "model": m, "attack": a, "seed": str(s)})
            for d in cfg["datasets"] for m in cfg["models"] for a, n in attacks for s in range(n)]
    return jobs + [("prepare_data", {"dataset": d}) for d in cfg["datasets"]]


def measured(rate: float, device: str = "cpu", calls: list | None = None):
    """A stand-in for the child process that measures: every model trains at ``rate`` images/s."""
    def probe(device_setting, models, precision, channels_last, threads):
        if calls is not None:
            calls.append(dict(device=device_setting, models=models, precision=precision, threads=threads))
        if device != "cpu":
            return {"device": device}
        return {"device": "cpu", "precision": precision, "steps": 3,
                "images_per_second": {name: rate for name in models}}
    return probe


def not_measured(*args):
    raise AssertionError("measured a study that cannot take long")


def specs(cfg: dict):
    return lambda name: cfg["datasets"][name]


def test_paper_study_on_a_slow_cpu_warns_with_the_estimate_and_the_cpu_study_command(tmp_path):
    calls = []
    message = long_cpu_study_warning(PAPER, training_jobs(PAPER), specs(PAPER), str(tmp_path), cores=2,
                                     environ={}, probe=measured(12.0, calls=calls))
    # 85 x 25 x 50,000 (CIFAR-10) + 85 x 25 x 26,640 (torchvision's GTSRB) images at 12 images/s, one job at a time
    assert (85 * 25 * 50_000 + 85 * 25 * 26_640) / 12.0 / 86400 == pytest.approx(157, abs=0.5)
    assert "training the 170 models about to run takes about 157 days" in message
    assert "162.9 million images" in message and "12 (pmoe widen 10, fp32)" in message
    assert CPU_STUDY_COMMAND in message and "goes on" in message
    # measured once, at the configured width and precision, on as many threads as a training job gets here
    assert calls == [dict(device="auto", models={"pmoe": PAPER["models"]["pmoe"]}, precision="fp32", threads=2)]


def test_smoke_study_is_silent_without_measuring(tmp_path):
    assert long_cpu_study_warning(SMOKE, training_jobs(SMOKE), specs(SMOKE), str(tmp_path), cores=2, environ={},
                                  probe=not_measured) is None


def test_a_study_that_will_use_a_gpu_is_silent(tmp_path):
    jobs = training_jobs(PAPER)
    assert long_cpu_study_warning(PAPER, jobs, specs(PAPER), str(tmp_path), cores=2, environ={},
                                  probe=measured(12.0, device="cuda")) is None
    on_gpu = dict(PAPER, device="cuda")  # named in the config: nothing to measure
    assert long_cpu_study_warning(on_gpu, jobs, specs(PAPER), str(tmp_path), cores=2, environ={},
                                  probe=not_measured) is None


def test_silent_when_no_training_is_about_to_run_or_the_cpu_is_fast_enough(tmp_path):
    prepare_only = [job for job in training_jobs(PAPER) if job[0] != "train_model"]
    assert long_cpu_study_warning(PAPER, prepare_only, specs(PAPER), str(tmp_path), cores=2, environ={},
                                  probe=not_measured) is None
    one_run = training_jobs(PAPER)[:1]  # 25 epochs x 50,000 images at 68 images/s: 5 hours
    assert long_cpu_study_warning(PAPER, one_run, specs(PAPER), str(tmp_path), cores=2, environ={},
                                  probe=measured(68.0)) is None


def test_the_test_variable_replaces_the_measurement_and_no_pointer_while_running_the_cpu_study(tmp_path):
    message = long_cpu_study_warning(SMOKE, training_jobs(SMOKE), specs(SMOKE), str(tmp_path), cores=2,
                                     configfiles=[str(REPO / "config" / "cpu.yaml")],
                                     environ={TEST_RATE_VARIABLE: "0.01"}, probe=not_measured)
    assert "training the 8 models about to run takes about" in message and TEST_RATE_VARIABLE in message
    assert CPU_STUDY_COMMAND not in message


def test_packed_jobs_count_their_runs_and_the_links_count_nothing():
    jobs = [("train_pack", {"dataset": "cifar10", "model": "pmoe", "attack": "clean", "first": "0", "last": "4"}),
            ("train_pack", {"dataset": "cifar10", "model": "pmoe", "attack": "clean", "first": "5", "last": "9"}),
            ("train_model", {"dataset": "cifar10", "model": "pmoe", "attack": "clean", "seed": "0"})]
    assert training_work(jobs, 5, lambda name: 100) == [TrainingWork("cifar10", "pmoe", 2, 10, 100)]
    assert training_work(jobs, 1, lambda name: 100) == [TrainingWork("cifar10", "pmoe", 1, 1, 100)]


def test_concurrent_jobs_follow_the_cores_and_the_threads_per_job():
    assert concurrent_jobs(cores=2, train_threads=4, jobs=170) == 1  # Snakemake scales the job down to 2 threads
    assert concurrent_jobs(cores=16, train_threads=4, jobs=170) == 4
    assert concurrent_jobs(cores=16, train_threads=4, jobs=2) == 2


def test_training_images_from_the_config_a_file_header_or_the_prepared_data(tmp_path):
    assert train_images({"source": "synthetic", "n_train": 600}) == 600
    assert train_images({"source": "torchvision", "name": "cifar10", "subset": {"n_train": 10_000}}) == 10_000
    np.savez_compressed(tmp_path / "d.npz", x_train=np.zeros((7, 32, 32, 3), np.uint8), y_train=np.zeros(7))
    assert train_images({"source": "npz", "path": str(tmp_path / "d.npz")}) == 7
    for i in range(3):
        (tmp_path / "folder" / "train" / f"class{i % 2}").mkdir(parents=True, exist_ok=True)
        (tmp_path / "folder" / "train" / f"class{i % 2}" / f"{i}.png").write_bytes(b"")
    assert train_images({"source": "imagefolder", "path": str(tmp_path / "folder")}) == 3
    assert train_images({"source": "npz", "path": str(tmp_path / "missing.npz")}) is None
    assert train_images({"source": "npz"}, prepared=tmp_path / "d.npz") == 7
    with zipfile.ZipFile(tmp_path / "broken.npz", "w") as archive:
        archive.writestr("x_train.npy", b"not an array")
    assert train_images({"source": "npz", "path": str(tmp_path / "broken.npz")}) is None


def test_the_child_process_measures_the_configured_model_on_the_cpu():
    found = probe_machine("cpu", {"tiny": {"arch": "pmoe", "widen_factor": 1}}, "fp32", True, 1)
    assert found["device"] == "cpu" and found["precision"] == "fp32" and found["steps"] >= 2
    assert found["images_per_second"]["tiny"] > 0


def test_the_workflow_entry_reads_the_dag_and_leaves_clusters_touch_and_its_own_errors_quiet(tmp_path, monkeypatch):
    monkeypatch.setenv(TEST_RATE_VARIABLE, "0.01")
    jobs = [SimpleNamespace(rule=SimpleNamespace(name=rule), wildcards_dict=wc) for rule, wc in training_jobs(SMOKE)]

    def workflow(local_exec=True, touch=False, needrun_jobs=lambda: jobs):
        return SimpleNamespace(local_exec=local_exec, touch=touch, dag=SimpleNamespace(needrun_jobs=needrun_jobs),
                               resource_settings=SimpleNamespace(cores=2),
                               config_settings=SimpleNamespace(configfiles=[]))

    assert "training the 8 models" in workflow_warning(workflow(), SMOKE, specs(SMOKE), str(tmp_path))
    assert workflow_warning(workflow(local_exec=False), SMOKE, specs(SMOKE), str(tmp_path)) is None
    assert workflow_warning(workflow(touch=True), SMOKE, specs(SMOKE), str(tmp_path)) is None
    broken = workflow(needrun_jobs=lambda: [SimpleNamespace(rule=SimpleNamespace(name="train_model"),
                                                            wildcards_dict={})])
    assert workflow_warning(broken, SMOKE, specs(SMOKE), str(tmp_path)).startswith("(no estimate")


@pytest.mark.e2e
def test_a_real_run_prints_the_warning_before_training_and_a_dry_run_does_not(tmp_path, monkeypatch, run_workflow):
    pytest.importorskip("snakemake", reason="the workflow extra is not installed (pip install -e '.[workflow]')")
    monkeypatch.setenv(TEST_RATE_VARIABLE, "0.01")  # the smoke config's one training made to look like days
    target = "results/synth/pmoe/clean/seed0/weights.safetensors"
    dry = run_workflow(tmp_path, "-n", target)
    assert "LONG STUDY ON THE CPU" not in dry.stdout + dry.stderr
    real = run_workflow(tmp_path, target)
    console = real.stdout + real.stderr
    assert "LONG STUDY ON THE CPU: the config's device is cpu, so training the 1 model about to run takes" in console
    assert CPU_STUDY_COMMAND in console
    # before the first job, and the run went on
    assert console.index("LONG STUDY ON THE CPU") < console.index("rule prepare_data")
    assert (tmp_path / target).is_file()
