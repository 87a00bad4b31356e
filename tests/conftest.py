"""Shared fixtures: small ones for the library unit tests, and one finished smoke run of the whole workflow."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "config" / "smoke.yaml"


@pytest.fixture(scope="module")
def one_thread():
    """Run a module's tests with one intra-op thread (restored afterwards). On the 2-core test machine,
    which other jobs share, two torch threads per process contend badly and are ~5x slower than one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def run_snakemake(workdir: Path, *args: str, configfile: Path = SMOKE, timeout: float = 900
                  ) -> subprocess.CompletedProcess:
    """The real Snakefile in ``workdir``; fails the test with Snakemake's output when it fails."""
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(workdir),
           "--configfile", str(configfile), "--cores", "2", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        pytest.fail(f"snakemake {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                    f"{proc.stderr[-5000:]}")
    return proc


@pytest.fixture(scope="session")
def run_workflow():
    """:func:`run_snakemake`, for tests in other modules."""
    return run_snakemake


@pytest.fixture(scope="session")
def smoke_workdir(tmp_path_factory) -> Path:
    """A finished run of the smoke config, made once per test session and shared (read-only: a test that changes
    the config or the results makes its own). ``PMOE_SMOKE_WORKDIR`` names an existing working directory to reuse
    instead (it is brought up to date first, which costs nothing when it already is)."""
    if os.environ.get("CI"):
        import snakemake  # noqa: F401  (CI must run the end-to-end tests: a missing Snakemake fails them)
    else:
        pytest.importorskip("snakemake", reason="the workflow extra is not installed (pip install -e '.[workflow]')")
    given = os.environ.get("PMOE_SMOKE_WORKDIR")
    workdir = Path(given) if given else tmp_path_factory.mktemp("smoke-shared")
    run_snakemake(workdir)
    return workdir
