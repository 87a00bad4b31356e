"""Where and how a job computes: device choice and claims, precision, input layout, seeds, threads, memory, logs.

Every other module imports these from here, so the engine (``train``) and the measurements (``evaluate``)
do not import each other.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
import tempfile
import time
import traceback
import zlib
from pathlib import Path
from typing import Callable, Iterator, TextIO

import numpy as np
import torch

PRECISIONS = ("fp32", "bf16")
# environment variables by which a batch scheduler says it has placed the job (and chosen its GPUs)
SCHEDULER_JOB_VARS = ("SLURM_JOB_ID", "PBS_JOBID", "LSB_JOBID", "JOB_ID")


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks cuda, then mps, then cpu; an explicit name is checked for availability."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    dev = torch.device(name)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {name!r} requested but CUDA is not available; use 'auto' or 'cpu'")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise RuntimeError(f"device {name!r} does not exist: this machine has {torch.cuda.device_count()} "
                               f"CUDA device(s), cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise RuntimeError(f"device {name!r} requested but MPS is not available; use 'auto' or 'cpu'")
    return dev


def cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def effective_precision(device: torch.device, precision: str) -> str:
    """bf16 autocast only where the hardware runs it natively (CUDA with bf16, CPUs with AVX512-BF16/AMX)."""
    if precision != "bf16":
        return "fp32"
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if device.type == "cpu":
        return "bf16" if cpu_has_bf16() else "fp32"
    return "bf16" if device.type == "mps" else "fp32"


def autocast(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def to_input(xb: torch.Tensor, channels_last: bool = True) -> torch.Tensor:
    """uint8 (B, 32, 32, 3) -> float (B, 3, 32, 32) in [0, 1]; the permute of NHWC data *is* channels_last."""
    x = xb.permute(0, 3, 1, 2).float().div_(255.0)
    return x if channels_last else x.contiguous()


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)


def derived_seed(seed: int, tag: str) -> int:
    """An independent stream per purpose: the same run seed gives unrelated seeds for 'poison', 'warp', ..."""
    return int(np.random.SeedSequence([int(seed), zlib.crc32(tag.encode())]).generate_state(1)[0])


def set_threads(threads: int | None) -> None:
    if threads:
        torch.set_num_threads(int(threads))


def reuse_freed_memory() -> bool:
    """Tell glibc's allocator to serve every allocation from its heap and to keep what is freed there.

    By default glibc maps each allocation above a threshold (at most 32 MiB) fresh from the kernel and unmaps it
    when freed, and returns freed heap above 2x that threshold to the kernel: a CPU training step at widen 10 (maps
    of 84 MB at batch 128) then spends a third of its time in page faults zeroing new memory every step. Measured
    on a 2-core AMD EPYC VM (benchmarks/README.md, "At TensorFlow's speed"): whole widen-10 fp32 epochs 1.46x,
    widen 2 1.15x, at a higher resident peak (the largest step's working set stays reserved). Returns False where
    the C library is not glibc (nothing changed). Process-wide: the job layer (:mod:`pmoe_backdoor.jobs`) calls it.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # glibc's malloc.h
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, 2**31 - 1))


@contextlib.contextmanager
def log_to(path: str | os.PathLike | None) -> Iterator[None]:
    """Send stdout and stderr of a job to its log file (Snakemake's ``log:``)."""
    if not path:
        yield
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", buffering=1) as fh, contextlib.redirect_stdout(fh), contextlib.redirect_stderr(fh):
        try:
            yield
        except BaseException:
            traceback.print_exc(file=fh)  # the log says why the job failed
            raise


def default_lock_dir() -> Path:
    """Per-user, per-machine and outside the working tree: locks are about this machine's GPUs, not a run."""
    base = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
    user = os.environ.get("USER") or str(os.getuid())
    return Path(base) / f"pmoe-backdoor-gpu-locks-{user}"


def scheduler_assigned_gpus() -> bool:
    """A scheduler placed this job and restricted it to its GPUs: use them, lock nothing."""
    return bool(os.environ.get("CUDA_VISIBLE_DEVICES")) and any(v in os.environ for v in SCHEDULER_JOB_VARS)


@contextlib.contextmanager
def claim_device(device: str = "auto", lock_dir: str | os.PathLike | None = None, jobs_per_gpu: int = 1,
                 poll_seconds: float = 5.0) -> Iterator[str]:
    """Give concurrent jobs distinct GPUs: Snakemake counts ``gpu`` resources but assigns no ids, so each job
    takes an exclusive lock on one of ``jobs_per_gpu`` slots of one device and trains there. Without CUDA,
    with an explicit device, or under a scheduler that assigned the GPU, the device is returned unchanged."""
    if device != "auto" or not torch.cuda.is_available():
        yield device
        return
    if scheduler_assigned_gpus():
        print(f"using the scheduler's GPU (CUDA_VISIBLE_DEVICES={os.environ['CUDA_VISIBLE_DEVICES']})")
        yield "cuda:0"
        return
    import fcntl

    lock_dir = Path(lock_dir) if lock_dir is not None else default_lock_dir()
    lock_dir.mkdir(parents=True, exist_ok=True)
    count = torch.cuda.device_count()
    while True:
        for slot in range(max(1, int(jobs_per_gpu))):
            for i in range(count):
                fh = open(lock_dir / f"cuda{i}.{slot}.lock", "w")
                try:
                    fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    fh.close()
                    continue
                try:
                    print(f"claimed cuda:{i} slot {slot} (of {count} GPUs x {jobs_per_gpu})", file=sys.stderr)
                    yield f"cuda:{i}"
                finally:
                    fcntl.flock(fh, fcntl.LOCK_UN)
                    fh.close()
                return
        time.sleep(poll_seconds)  # more jobs than slots (--resources gpu exceeds them): wait for one


class _EagerFallback:
    """Calls the compiled function; if compilation fails on first use, uses the eager one from then on."""

    def __init__(self, compiled: Callable, eager: Callable, log: TextIO | None, what: str):
        self.compiled, self.eager, self.log, self.what, self.ok = compiled, eager, log, what, None

    def __call__(self, *args):
        if self.ok is False:
            return self.eager(*args)
        try:
            out = self.compiled(*args)
            self.ok = True
            return out
        except Exception as exc:
            if self.ok:  # it worked before: a real error, not a compiler problem
                raise
            self.ok = False
            _note(self.log, f"torch.compile of {self.what} failed ({type(exc).__name__}: {exc}); running eagerly")
            return self.eager(*args)


def compiled_or_eager(fn: Callable, compile: bool, log: TextIO | None, what: str,
                      dynamic: bool | None = None) -> Callable:
    """``fn`` compiled by torch.compile when asked (``dynamic`` as torch.compile's), falling back to ``fn`` itself
    wherever compiling fails."""
    if not compile:
        return fn
    try:
        options = {} if dynamic is None else {"dynamic": dynamic}
        return _EagerFallback(torch.compile(fn, **options), fn, log, what)
    except Exception as exc:  # pragma: no cover - depends on the platform's compiler
        _note(log, f"torch.compile unavailable ({exc}); running {what} eagerly")
        return fn


def _note(log: TextIO | None, msg: str) -> None:
    if log is not None:
        print(f"note: {msg}", file=log, flush=True)
