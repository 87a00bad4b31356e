"""The execution profiles: the placeholder account stops a run with a clear message, and no profile is loaded into
runs that did not ask for it (that every GPU rule reaches the SLURM GPU partition: tests/test_dag.py)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SLURM = REPO / "profiles" / "slurm" / "config.yaml"


def test_no_profile_is_loaded_into_every_run():
    assert not (REPO / "profiles" / "default").exists()


@pytest.mark.skipif(shutil.which("sbatch") is not None, reason="a real cluster: a dry run would not show the error")
def test_the_placeholder_account_is_a_clear_error(tmp_path):
    pytest.importorskip("snakemake_executor_plugin_slurm")
    proc = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(tmp_path),
                           "--profile", str(SLURM.parent), "--configfile", str(REPO / "config" / "smoke.yaml"), "-n"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "slurm_account is still the placeholder CHANGE_ME" in proc.stdout + proc.stderr
