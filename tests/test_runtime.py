"""pmoe_backdoor.runtime (device claims, logs, derived seeds, the allocator setting) and
pmoe_backdoor.models.checkpoint (model files)."""

from __future__ import annotations

import platform
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from pmoe_backdoor import runtime
from pmoe_backdoor.models import checkpoint
from pmoe_backdoor.models.architectures import build_model


def test_concurrent_jobs_claim_distinct_gpus(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with runtime.claim_device("auto", tmp_path) as first, runtime.claim_device("auto", tmp_path) as second:
        assert {first, second} == {"cuda:0", "cuda:1"}
    # a third job waits until a device is released
    got = []
    with runtime.claim_device("auto", tmp_path), runtime.claim_device("auto", tmp_path):
        waiter = threading.Thread(target=lambda: got.append(_claim_once(tmp_path)))
        monkeypatch.setattr(runtime.time, "sleep", lambda s: None)
        waiter.start()
        waiter.join(timeout=0.5)
        assert got == [] and waiter.is_alive()
    waiter.join(timeout=10)
    assert got and got[0].startswith("cuda:")


def _claim_once(lock_dir):
    with runtime.claim_device("auto", lock_dir) as dev:
        return dev


def test_explicit_or_cpu_device_is_not_locked(tmp_path):
    with runtime.claim_device("cpu", tmp_path) as dev:
        assert dev == "cpu"
    assert not list(tmp_path.iterdir())


def test_log_to_keeps_output_and_traceback(tmp_path):
    log = tmp_path / "job.log"
    with pytest.raises(RuntimeError):
        with runtime.log_to(log):
            print("working")
            raise RuntimeError("the reason")
    text = log.read_text()
    assert "working" in text and "RuntimeError: the reason" in text


def test_derived_seeds_are_independent_and_stable():
    assert runtime.derived_seed(0, "poison") == runtime.derived_seed(0, "poison")
    seeds = {runtime.derived_seed(s, tag) for s in range(3) for tag in ("poison", "init", "shuffle")}
    assert len(seeds) == 9


def test_model_file_round_trip_without_pickle(tmp_path):
    torch.manual_seed(0)
    spec = {"arch": "pmoe", "widen_factor": 1}
    model = build_model("pmoe", 10, widen_factor=1)
    checkpoint.save_model(model, spec, 10, str(tmp_path / "w.safetensors"))
    loaded, meta = checkpoint.load_model(str(tmp_path / "w.safetensors"))
    assert meta["model"] == spec and meta["num_classes"] == 10
    for (k, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k


def test_load_model_rejects_a_file_that_is_not_a_model(tmp_path):
    from pmoe_backdoor.io import save_tensors

    save_tensors(tmp_path / "x.safetensors", {"a": torch.zeros(1)})
    with pytest.raises(ValueError, match="not a pmoe-backdoor model file"):
        checkpoint.load_model(str(tmp_path / "x.safetensors"))


def test_offline_download_names_the_dataset_and_the_way_out(monkeypatch, tmp_path):
    import urllib.error

    import torchvision

    from pmoe_backdoor.data.datasets import DatasetError
    from pmoe_backdoor.data.sources import load_source

    def offline(*args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    with pytest.raises(DatasetError, match=r"'cifar10'.*source: npz"):
        load_source({"source": "torchvision", "name": "cifar10", "root": str(tmp_path)})


def test_compile_failure_falls_back_to_eager_training(monkeypatch):
    import io

    from pmoe_backdoor.data.datasets import make_synthetic
    from pmoe_backdoor.training.loop import TrainConfig, fit

    class Broken(torch.nn.Module):
        def forward(self, x):
            raise RuntimeError("no compiler here")

    monkeypatch.setattr(torch, "compile", lambda model: Broken())
    ds = make_synthetic(num_classes=3, n_train=64, n_test=16, seed=0)
    torch.manual_seed(0)
    model = build_model("pmoe", 3, widen_factor=1)
    before = model.head.fc.weight.detach().clone()
    log = io.StringIO()
    cfg = TrainConfig(epochs=1, batch_size=32, compile=True, progress_seconds=0)
    history = fit(model, torch.from_numpy(ds.x_train), torch.from_numpy(ds.y_train), cfg,
                  device=torch.device("cpu"), log=log)
    assert "torch.compile of the model failed" in log.getvalue()
    assert len(history["epochs"]) == 1 and not torch.equal(before, model.head.fc.weight)


def test_gpu_slots_let_several_jobs_share_one_gpu(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with runtime.claim_device("auto", tmp_path, jobs_per_gpu=2) as a, runtime.claim_device("auto", tmp_path,
                                                                                            jobs_per_gpu=2) as b:
        assert {a, b} == {"cuda:0", "cuda:1"}  # spread over the GPUs first
        with runtime.claim_device("auto", tmp_path, jobs_per_gpu=2) as c:
            assert c in ("cuda:0", "cuda:1")  # then a second slot on one of them


def test_a_scheduler_assigned_gpu_is_used_without_a_lock(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    with runtime.claim_device("auto", tmp_path / "locks") as dev:
        assert dev == "cuda:0"
    assert not (tmp_path / "locks").exists()


def test_default_lock_dir_is_outside_the_working_tree(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    assert tmp_path not in runtime.default_lock_dir().resolve().parents


def test_a_gpu_that_does_not_exist_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(RuntimeError, match=r"'cuda:5' does not exist.*2 CUDA device"):
        runtime.resolve_device("cuda:5")


_MMAPPED_AFTER_A_64_MIB_TENSOR = """
import ctypes, sys
import torch
from pmoe_backdoor import runtime

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]

mallinfo2 = ctypes.CDLL(None).mallinfo2
mallinfo2.restype = MallInfo2
if sys.argv[1] == "reuse":
    assert runtime.reuse_freed_memory()
elif sys.argv[1] == "job":
    import pmoe_backdoor.jobs  # noqa: F401  (what every compute job's script imports)
before = mallinfo2().hblkhd
x = torch.ones(16 * 2**20)  # 64 MiB
print(mallinfo2().hblkhd - before)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's allocator only")
def test_reuse_freed_memory_serves_large_tensors_from_the_heap():
    def mmapped_bytes(mode: str) -> int:
        run = subprocess.run([sys.executable, "-c", _MMAPPED_AFTER_A_64_MIB_TENSOR, mode], capture_output=True,
                             text=True, check=True)
        return int(run.stdout.split()[-1])

    assert mmapped_bytes("default") >= 64 * 2**20  # glibc maps it fresh from the kernel...
    assert mmapped_bytes("reuse") == 0  # ...unless told to use (and keep) its heap
    assert mmapped_bytes("job") == 0  # as a job's process is


def test_every_threaded_job_script_imports_the_job_layer():
    """The job layer sets the allocator on import (scripts stay unchanged: Snakemake reruns jobs whose script
    changed), so every script that runs a compute job must import it."""
    scripts = sorted(Path(__file__).parents[1].glob("workflow/scripts/*/*.py"))
    # job_context (jobs/wrapper.py) sets the rule's threads for the scripts that open with it
    threaded = [p for p in scripts if any(opening in p.read_text() for opening in
                                          ("set_threads(snakemake.threads)", "job_context(snakemake)"))]
    assert len(threaded) >= 10
    assert [p.name for p in threaded if "from pmoe_backdoor.jobs" not in p.read_text()] == []
