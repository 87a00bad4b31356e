"""Benchmark 4: the workflow itself. `snakemake -n` on the paper's full config, a full smoke run and a no-op
rerun of it, and a job's fixed start-up cost.

    .venv/bin/python benchmarks/workflow_overhead.py
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import parser

REPO = Path(__file__).resolve().parents[1]


def snakemake(*args: str, cwd: Path = REPO) -> tuple[float, str]:
    """Seconds taken and the number of jobs Snakemake planned ('?' when it had nothing to do)."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), *args], cwd=cwd,
                          capture_output=True, text=True)
    sec = time.perf_counter() - t0
    if proc.returncode:
        sys.exit(f"snakemake {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    total = re.search(r"^total\s+(\d+)", proc.stdout + proc.stderr, re.M)
    return sec, total.group(1) if total else "?"


def main() -> None:
    parser(__doc__.splitlines()[0]).parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        runs = [snakemake("-d", tmp, "--configfile", str(REPO / "config/config.yaml"), "-n", "--cores", "1")
                for _ in range(3)]
        print(f"snakemake -n, paper config ({runs[0][1]} jobs): {min(r[0] for r in runs):.2f} s (best of 3)")
        smoke = ("-d", tmp, "--configfile", str(REPO / "config/smoke.yaml"), "--cores", "2")
        full, jobs = snakemake(*smoke)
        print(f"smoke config, full run ({jobs} jobs): {full:.1f} s")
        noop = min(snakemake(*smoke)[0] for _ in range(3))
        print(f"no-op rerun of the finished smoke workflow: {noop:.2f} s (best of 3)")
        # a job's fixed start-up: a fresh interpreter importing the library and loading a prepared dataset
        data = REPO.parent / "shared/data/cifar10-subset.npz"
        data = data if data.is_file() else Path(tmp) / "results/data/synth.npz"
        code = ("import sys; sys.path.insert(0, %r); from pmoe_backdoor.jobs.common import JobData; "
                "JobData.open(%r, 'cpu')" % (str(REPO / "src"), str(data)))
        starts = []
        for _ in range(3):
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-c", code], check=True)
            starts.append(time.perf_counter() - t0)
        print(f"job start-up (interpreter, imports, load {data.name}): {min(starts):.2f} s (best of 3)")


if __name__ == "__main__":
    main()
