"""How long the trainings a run is about to start take on this machine's CPU, and the console warning before a
study too large for a CPU (the paper's: weeks) starts; the warning stops nothing.

The Snakefile's ``onstart`` handler (run once the DAG is built, only when Snakemake executes: never in a dry run)
calls :func:`workflow_warning`. Nothing here imports torch or numpy at import time, and the Snakemake process never
does: the GPU check and the measurement (training steps of the configured model at its width and precision) run in
a child process, ``python -m pmoe_backdoor.cpu_estimate``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from .data.files import scan_image_folder

CPU_STUDY_COMMAND = ".venv/bin/snakemake --cores 2 --configfile config/cpu.yaml"
CPU_STUDY_CONFIG = "config/cpu.yaml"
# the CPU study itself takes a few hours on 2 cores: a warning is for a study that does not finish overnight
WARN_ABOVE_HOURS = 12.0
# for tests only: training images/s per job to assume instead of measuring (the machine is taken to have no GPU)
TEST_RATE_VARIABLE = "PMOE_TEST_ONLY_CPU_TRAIN_IMAGES_PER_S"
TRAINING_RULE = "train_model"  # one run per job; with train.pack > 1 a link to the packed job's run instead
PACKED_TRAINING_RULE = "train_pack"  # the runs of seeds {first}..{last} as one job
# torchvision's training splits (GTSRB's is GTSRB-Training_fixed.zip, not the official 39,209 images)
TORCHVISION_TRAIN_IMAGES = {"cifar10": 50_000, "gtsrb": 26_640}
# A training image of the pmoe costs about 4.8 GFLOP at widen 10 (forward + backward, benchmarks/README.md),
# scaling with the square of the width. No CPU trains below LEAST_CPU_GFLOP_PER_S (a single old core; this project's
# 2-core VMs reach 60-250), so a study that would not reach WARN_ABOVE_HOURS even at that rate is not measured.
GFLOP_PER_IMAGE_AT_WIDEN_10 = 4.8
LEAST_CPU_GFLOP_PER_S = 2.0
MEASURE_BATCH = 32  # per-image speed as at batch 128 on a CPU (measured at widen 10), in a quarter of the time
MEASURE_SECONDS = 1.5  # of training steps, at least two
PROBE_TIMEOUT_S = 120


@dataclass(frozen=True)
class TrainingWork:
    """The trainings about to run of one model on one dataset; train_images: per epoch of one run (None: unknown)."""

    dataset: str
    model: str
    jobs: int
    runs: int
    train_images: int | None


def training_work(jobs: Iterable[tuple[str, Mapping[str, str]]], pack: int,
                  train_images: Callable[[str], int | None]) -> list[TrainingWork]:
    """The training jobs among ``jobs``, per (dataset, model)."""
    counts: dict[tuple[str, str], list[int]] = {}
    for rule, wildcards in jobs:
        if pack > 1 and rule == PACKED_TRAINING_RULE:
            runs = int(wildcards["last"]) - int(wildcards["first"]) + 1
        elif pack <= 1 and rule == TRAINING_RULE:
            runs = 1
        else:
            continue
        jobs_runs = counts.setdefault((wildcards["dataset"], wildcards["model"]), [0, 0])
        jobs_runs[0], jobs_runs[1] = jobs_runs[0] + 1, jobs_runs[1] + runs
    return [TrainingWork(dataset, model, n_jobs, runs, train_images(dataset))
            for (dataset, model), (n_jobs, runs) in counts.items()]


def npz_rows(path: str | os.PathLike, array: str = "x_train") -> int | None:
    """The number of rows of one array of an npz file, from its header only (None if unreadable)."""
    from numpy.lib import format as npy
    try:
        with zipfile.ZipFile(path) as archive, archive.open(f"{array}.npy") as fh:
            read_header = npy.read_array_header_1_0 if npy.read_magic(fh) == (1, 0) else npy.read_array_header_2_0
            shape = read_header(fh)[0]
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return None
    return int(shape[0]) if shape else None


def train_images(spec: Mapping[str, Any], prepared: str | os.PathLike | None = None) -> int | None:
    """Training images of a dataset from its config block (``path`` absolute, as the workflow's ``dataset_spec``
    gives it), without loading it; else from its prepared npz if there is one; None when neither says."""
    source, full = spec.get("source"), None
    if source == "synthetic":
        full = int(spec.get("n_train", 1000))
    elif source == "torchvision":
        full = TORCHVISION_TRAIN_IMAGES.get(spec.get("name"))
    elif source == "npz" and spec.get("path"):
        full = npz_rows(spec["path"])
    elif source == "imagefolder" and spec.get("path"):
        full = sum(len(files) for files in scan_image_folder(spec["path"]).get("train", {}).values()) or None
    if full is None and prepared is not None and Path(prepared).is_file():
        return npz_rows(prepared)  # already the subset, if any
    subset = (spec.get("subset") or {}).get("n_train")
    return min(full, int(subset)) if full is not None and subset else full


def width(model_spec: Mapping[str, Any]) -> int:
    """The widen factor that sets the model's cost (moe_width fixed keeps widen 10's MoE channels at any width)."""
    widen = int(model_spec.get("widen_factor", 10))
    return max(widen, 10) if model_spec.get("moe_width") == "fixed" else widen


def may_take_long(work: list[TrainingWork], models: Mapping[str, Mapping[str, Any]], epochs: int,
                  hours: float = WARN_ABOVE_HOURS) -> bool:
    """Whether the trainings could take ``hours`` even on the slowest CPU (if not, measuring is not worth it)."""
    gflop = sum(w.runs * epochs * (w.train_images or 0) * GFLOP_PER_IMAGE_AT_WIDEN_10
                * (width(models[w.model]) / 10) ** 2 for w in work)
    return gflop / LEAST_CPU_GFLOP_PER_S >= hours * 3600


def concurrent_jobs(cores: int, train_threads: int, jobs: int) -> int:
    """How many training jobs Snakemake runs at once on ``cores`` (it scales a job's threads down to the cores)."""
    threads = max(1, min(train_threads, cores))
    return max(1, min(cores // threads, jobs))


def training_seconds(work: Iterable[TrainingWork], epochs: int, rates: Mapping[str, float], concurrent: int) -> float:
    """Seconds to train ``work`` at ``rates`` (training images per second of one job, per model)."""
    return sum(w.runs * epochs * (w.train_images or 0) / rates[w.model] for w in work) / concurrent


def number(x: float) -> str:
    """Three significant digits at most, in words above a million."""
    if x >= 1e6:
        return f"{x / 1e6:,.1f} million"
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def duration(seconds: float) -> str:
    hours = seconds / 3600
    if hours >= 48:
        return f"{hours / 24:.0f} days"
    return f"{hours:.1f} hours" if hours >= 1 else f"{seconds / 60:.0f} minutes"


def measure_images_per_second(model_spec: Mapping[str, Any], precision: str, channels_last: bool = True,
                              threads: int | None = None, seconds: float = MEASURE_SECONDS
                              ) -> tuple[float, str, int]:
    """Training images per second of one job on this CPU: SGD steps of the model at its width and precision, as
    ``train.fit`` takes them, for ``seconds`` (at least two steps). Returns (images/s of the fastest step, the
    precision used, steps timed)."""
    import torch
    import torch.nn.functional as F

    from .models.checkpoint import model_from_spec
    from .runtime import autocast, effective_precision, reuse_freed_memory, set_threads, to_input

    reuse_freed_memory()  # as in the training jobs (pmoe_backdoor.jobs): 1.1-1.5x faster CPU steps
    set_threads(threads)
    device = torch.device("cpu")
    precision = effective_precision(device, precision)
    torch.manual_seed(0)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    model = model_from_spec(dict(model_spec), 10).train().to(memory_format=layout)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.randint(0, 256, (MEASURE_BATCH, 32, 32, 3), dtype=torch.uint8)
    y = torch.randint(0, 10, (MEASURE_BATCH,))

    def step() -> float:
        start = time.perf_counter()
        with autocast(device, precision):
            logits = model(to_input(x, channels_last))
        loss = F.cross_entropy(logits.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return time.perf_counter() - start

    # the first step also creates the kernels and allocates the activations: the fastest of two or more counts
    times, start = [], time.perf_counter()
    while len(times) < 2 or time.perf_counter() - start < seconds:
        times.append(step())
    return MEASURE_BATCH / min(times), precision, len(times)


def probe_machine(device: str, models: Mapping[str, Mapping[str, Any]], precision: str, channels_last: bool,
                  threads: int, timeout: float = PROBE_TIMEOUT_S) -> dict[str, Any] | None:
    """In a child process (torch stays out of Snakemake's): the device the jobs will get and, on a CPU, each model's
    training images per second (see :func:`main`). None if the child fails (no torch, say): nothing to tell then."""
    request = dict(device=device, models=models, precision=precision, channels_last=channels_last, threads=threads)
    src = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p))
    try:
        proc = subprocess.run([sys.executable, "-m", __name__, json.dumps(request)], capture_output=True,
                              text=True, timeout=timeout, env=env)
        return json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired, ValueError, IndexError):
        return None


def warning_message(work: list[TrainingWork], epochs: int, rates: Mapping[str, float], rate_source: str,
                    models: Mapping[str, Mapping[str, Any]], precision: str, concurrent: int, seconds: float,
                    device: str, suggest_cpu_study: bool = True) -> str:
    runs, jobs = sum(w.runs for w in work), sum(w.jobs for w in work)
    images, plural = sum(w.runs * epochs * (w.train_images or 0) for w in work), "s" if runs > 1 else ""
    per_dataset: dict[str, list] = {}
    for w in work:
        per_dataset.setdefault(w.dataset, [w.train_images, 0])[1] += w.runs
    sizes = " or ".join(f"{n_images:,} ({n} on {dataset})" if n_images else f"? ({n} on {dataset}: not counted)"
                        for dataset, (n_images, n) in sorted(per_dataset.items()))
    speeds = ", ".join(f"{number(rates[name])} ({'' if name == spec.get('arch') else f'{name}: '}{spec.get('arch')} "
                       f"widen {spec.get('widen_factor', 10)}, {precision})" for name, spec in models.items())
    why = "the config's device is cpu" if device == "cpu" else "no GPU found (device auto)"
    lines = [
        f"LONG STUDY ON THE CPU: {why}, so training the {runs} model{plural} about to run takes about "
        f"{duration(seconds)} here:",
        f"  {runs} training{plural}" + (f" (in {jobs} packed jobs)" if jobs != runs else "")
        + f" x {epochs} epochs x {sizes} training images = {number(images)} images",
        f"  / {speeds} training images/s per job ({rate_source})",
        f"  x {'one job' if concurrent == 1 else f'{concurrent} jobs'} at a time. The training alone: evaluation and "
        "the defenses' jobs come on top.",
    ]
    if suggest_cpu_study:
        lines += ["  The study sized for a CPU (a few hours on 2 cores; the same attacks, a narrow model, 10k-image "
                  f"subsets: {CPU_STUDY_CONFIG}):",
                  "  stop this run (Ctrl-C) and start, from the repository root:",
                  f"    {CPU_STUDY_COMMAND}"]
    return "\n".join(lines + ["  This run goes on."])


def long_cpu_study_warning(config: Mapping[str, Any], jobs: Iterable[tuple[str, Mapping[str, str]]],
                           dataset_spec: Callable[[str], Mapping[str, Any]], prepared_dir: str = "results/data",
                           cores: int | None = None, configfiles: Iterable[str | os.PathLike] = (),
                           environ: Mapping[str, str] = os.environ, probe: Callable = probe_machine) -> str | None:
    """The warning to print before ``jobs`` start, or None: none when the jobs will use a GPU, train nothing or
    take less than WARN_ABOVE_HOURS. ``dataset_spec(name)``: a dataset's config block, paths absolute;
    ``configfiles``: the run's config files (no pointer to the CPU study while running it)."""
    device = str(config.get("device", "auto"))
    if device not in ("auto", "cpu"):
        return None  # cuda or mps, named
    train, models = config["train"], config["models"]
    work = training_work(jobs, int(train.get("pack", 1)),
                         lambda name: train_images(dataset_spec(name), Path(prepared_dir) / f"{name}.npz"))
    if not work:
        return None
    epochs, precision = int(train["epochs"]), str(train.get("precision", "fp32"))
    available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    cores = min(cores or available, available)
    train_threads = int(config["resources"]["train_threads"])
    threads = max(1, min(train_threads, cores))
    used = {w.model: dict(models[w.model]) for w in work}
    if environ.get(TEST_RATE_VARIABLE):
        rates = {name: float(environ[TEST_RATE_VARIABLE]) for name in used}
        rate_source = f"from {TEST_RATE_VARIABLE}, not measured"
    else:
        if not may_take_long(work, models, epochs):
            return None
        found = probe(device, used, precision, bool(train.get("channels_last", True)), threads)
        if not found or found.get("device") != "cpu":
            return None
        rates, precision = found["images_per_second"], found["precision"]
        rate_source = (f"measured just now: the best of {found['steps']} steps of batch {MEASURE_BATCH} on {threads} "
                       f"thread{'s' if threads > 1 else ''}")
    concurrent = concurrent_jobs(cores, train_threads, sum(w.jobs for w in work))
    seconds = training_seconds(work, epochs, rates, concurrent)
    if seconds < WARN_ABOVE_HOURS * 3600:
        return None
    running_cpu_study = any(Path(f).resolve().parts[-2:] == Path(CPU_STUDY_CONFIG).parts for f in configfiles)
    return warning_message(work, epochs, rates, rate_source, used, precision, concurrent, seconds, device,
                           suggest_cpu_study=not running_cpu_study)


def workflow_warning(workflow, config: Mapping[str, Any], dataset_spec: Callable[[str], Mapping[str, Any]],
                     prepared_dir: str) -> str | None:
    """:func:`long_cpu_study_warning` for the jobs a Snakemake workflow is about to run; None for a cluster's jobs
    (they run where this process cannot look) or ``--touch``."""
    if not workflow.local_exec or workflow.touch:
        return None
    try:
        jobs = [(job.rule.name, dict(job.wildcards_dict)) for job in workflow.dag.needrun_jobs()]
        return long_cpu_study_warning(config, jobs, dataset_spec, prepared_dir, workflow.resource_settings.cores,
                                      workflow.config_settings.configfiles)
    except Exception as exc:  # a warning must never stop the run
        return f"(no estimate of the training time on this CPU: {type(exc).__name__}: {exc})"


def main(argv: list[str] | None = None) -> None:
    """The child process of :func:`probe_machine`: prints one JSON line."""
    from .runtime import resolve_device
    request = json.loads((sys.argv[1:] if argv is None else argv)[0])
    device = resolve_device(request["device"])
    if device.type != "cpu":
        print(json.dumps({"device": device.type}))
        return
    rates, precision, steps = {}, request["precision"], 0
    for name, spec in request["models"].items():
        rates[name], precision, steps = measure_images_per_second(spec, request["precision"],
                                                                  request["channels_last"], request["threads"])
    print(json.dumps({"device": "cpu", "precision": precision, "images_per_second": rates, "steps": steps}))


if __name__ == "__main__":
    main()
