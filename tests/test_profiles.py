"""The execution profiles: every GPU rule reaches the SLURM GPU partition, the placeholder account stops a run
with a clear message, and no profile is loaded into runs that did not ask for it."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SLURM = REPO / "profiles" / "slurm" / "config.yaml"


def gpu_rules() -> set[str]:
    """Rules whose resources ask for a GPU (gpu=1), read from rules/*.smk (`use rule` copies included)."""
    found = set()
    for smk in (REPO / "rules").glob("*.smk"):
        blocks = re.split(r"^(?=\s*(?:rule |use rule ))", smk.read_text(), flags=re.M)
        for block in blocks:
            name = re.match(r"\s*(?:rule (\w+)|use rule \w+ as (\w+))", block)
            if name and re.search(r"^\s+gpu=1,", block, flags=re.M):
                found.add(name.group(1) or name.group(2))
    return found


def test_every_gpu_rule_goes_to_the_gpu_partition():
    profile = yaml.safe_load(SLURM.read_text())
    rules = gpu_rules()
    assert {"train_model", "train_pack", "fine_prune", "neural_cleanse"} <= rules
    cpu_partition = profile["default-resources"]["slurm_partition"]
    for rule in rules:
        settings = profile["set-resources"].get(rule)
        assert settings, f"profiles/slurm: GPU rule {rule!r} has no set-resources entry (it would run on CPU nodes)"
        assert settings["slurm_partition"] != cpu_partition, rule
        # the GPU itself is requested by the rule's own gpu=1 (the plugin turns it into --gpus=1); a gres as well
        # would ask twice
        assert "gres" not in settings, rule
        # runtime and memory come from the workflow config, not fixed numbers in the profile
        assert not {"runtime", "mem_mb"} & set(settings), rule


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
