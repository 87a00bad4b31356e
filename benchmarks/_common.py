"""Shared helpers for the benchmark scripts: timing, thread setup and a matmul peak probe."""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch intra-op threads (default: all cores)")
    p.add_argument("--malloc", choices=["reuse", "default"], default="reuse",
                   help="reuse: glibc keeps freed memory, as the workflow's jobs set it (runtime.reuse_freed_memory); "
                        "default: glibc's defaults (fresh pages for large allocations)")
    return p


def setup(threads: int, malloc: str = "reuse") -> None:
    torch.set_num_threads(threads)
    if malloc == "reuse":
        from pmoe_backdoor import runtime  # the --src library where a benchmark set one

        reuse = getattr(runtime, "reuse_freed_memory", None)  # absent in libraries before it was added
        malloc = "reuse" if reuse is not None and reuse() else "default (reuse not available)"
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{threads} threads, cuda={torch.cuda.is_available()}, malloc {malloc}")


def timed(fn: Callable[[], object], repeat: int, warmup: int = 1, sync: Callable[[], None] = lambda: None) -> float:
    """Seconds per call: ``warmup`` untimed calls, then the best of three runs of ``repeat`` calls."""
    for _ in range(warmup):
        fn()
    sync()
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(repeat):
            fn()
        sync()
        best = min(best, (time.perf_counter() - t0) / repeat)
    return best


def matmul_peak(dtype: torch.dtype, n: int = 2048, device: str = "cpu") -> float:
    """Dense n x n matrix-multiply FLOP/s: the practical limit the training step is compared with."""
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    sec = timed(lambda: a @ b, repeat=5)
    return 2 * n**3 / sec
