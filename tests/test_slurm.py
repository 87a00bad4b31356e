"""A real SLURM run: the smoke config through a copy of profiles/slurm on a one-node cluster that
tests/slurm/setup_slurm.sh installs and starts (Debian's packages; root), checked against the scheduler's own
accounting (sacct) and against a local run's tables.

It only runs when asked for: ``PMOE_SLURM=1 pytest tests/test_slurm.py`` or ``pytest -m slurm``. Measured on a
2-core VM that other work loaded: 20.5 min (the SLURM run 13.9, the local run 6.6, installing and starting the
cluster ~20 s); each SLURM job starts Snakemake twice (sbatch's job, then srun's step), ~7 CPU-s more than locally."""

from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
import time
from collections import Counter
from datetime import datetime, timedelta
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "config" / "smoke.yaml"
SETUP = REPO / "tests" / "slurm" / "setup_slurm.sh"
PROFILE = REPO / "profiles" / "slurm" / "config.yaml"
ACCOUNT = "pmoe"  # the account setup_slurm.sh creates
# wall-clock measurements: the one thing a SLURM run may not reproduce
TIMING_COLUMNS = {"seconds"}

pytestmark = pytest.mark.slurm


def asked_for(config: pytest.Config) -> bool:
    """PMOE_SLURM=1, or a -m expression that selects the slurm marker (not `not slurm`)."""
    if os.environ.get("PMOE_SLURM") == "1":
        return True
    return re.search(r"(?<!not )\bslurm\b", config.getoption("markexpr", default="") or "") is not None


@pytest.fixture(scope="session")  # the scope of smoke_workdir: set up (or skipped) before it, not after
def slurm_cluster(request):
    """The one-node cluster, up (setup_slurm.sh is idempotent: a second when it already is)."""
    if not asked_for(request.config):
        pytest.skip("a real SLURM cluster on this machine: PMOE_SLURM=1 or -m slurm (needs root the first time)")
    start = time.monotonic()
    proc = subprocess.run(["bash", str(SETUP)], capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        pytest.fail(f"tests/slurm/setup_slurm.sh failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    print(f"\n{proc.stdout}cluster ready in {time.monotonic() - start:.0f} s")


def profile_copy(dest: Path, account: str = ACCOUNT) -> Path:
    """profiles/slurm with the account filled in and the waits a one-node cluster does not need made short;
    partitions, resources and every set-resources entry as shipped."""
    profile = yaml.safe_load(PROFILE.read_text())
    profile["default-resources"]["slurm_account"] = account
    profile.update({
        "latency-wait": 5,  # one machine: an output is there when the job ends
        "slurm-init-seconds-before-status-checks": 1,  # the plugin waits 40 s before its first sacct otherwise
        "seconds-between-status-checks": 1,
        "slurm-keep-successful-logs": True,  # .snakemake/slurm_logs, for a failure's diagnosis
    })
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "config.yaml").write_text(yaml.safe_dump(profile, sort_keys=False))
    return dest


def sacct_jobs(run_id: str) -> list[dict[str, str]]:
    """The scheduler's record of every job of one Snakemake run (the plugin names each job after the run ID)."""
    fields = ["JobIDRaw", "Comment", "Partition", "Account", "State", "AllocTRES", "Timelimit"]
    since = f"{datetime.now() - timedelta(days=1):%Y-%m-%dT%H:%M}"
    out = subprocess.run(["sacct", "-X", "-P", "-n", "--name", run_id, "--starttime", since, "--endtime", "now",
                          "-o", ",".join(fields)], capture_output=True, text=True, check=True).stdout
    return [dict(zip(fields, line.split("|"))) for line in out.splitlines() if line]


def rule_of(comment: str) -> str:
    """The rule of a job from the comment the plugin gives it: rule_<rule>[_wildcards_<values>]."""
    return comment.removeprefix("rule_").split("_wildcards_")[0]


def read_table(path: Path) -> list[dict[str, str]]:
    """A CSV table's rows as written, without its wall-clock columns."""
    with path.open(newline="") as f:
        return [{k: v for k, v in row.items() if k not in TIMING_COLUMNS} for row in csv.DictReader(f)]


def test_smoke_run_through_slurm(slurm_cluster, smoke_workdir, tmp_path):
    profile = profile_copy(tmp_path / "profile")
    work = tmp_path / "work"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--profile",
                           str(profile), "--configfile", str(SMOKE)], cwd=work, env=env, capture_output=True,
                          text=True, timeout=3600)
    log = proc.stdout + proc.stderr
    elapsed = time.monotonic() - start
    assert proc.returncode == 0, f"snakemake through SLURM failed ({proc.returncode}):\n{log[-8000:]}"
    print(f"smoke run through SLURM: {elapsed:.0f} s")

    # every job Snakemake sent to the cluster (a `rule` header; `localrule` ran in Snakemake's own process) is in
    # the scheduler's accounting once, completed (a retried job would show twice, failed first), under the account
    run_id = re.search(r"SLURM run ID: (\S+)", log).group(1)
    total = int(re.search(r"^total +(\d+)$", log, flags=re.M).group(1))  # Snakemake's job stats
    sent = Counter(re.findall(r"^rule (\w+):", log, flags=re.M))
    local = Counter(re.findall(r"^localrule (\w+):", log, flags=re.M))
    assert sent and sum(sent.values()) + sum(local.values()) == total, (total, sent, local)
    jobs = sacct_jobs(run_id)
    assert Counter(rule_of(j["Comment"]) for j in jobs) == sent, f"sacct: {jobs}"
    assert {j["State"] for j in jobs} == {"COMPLETED"}, [j for j in jobs if j["State"] != "COMPLETED"]
    assert {j["Account"] for j in jobs} == {ACCOUNT}

    # each job in the partition the profile names for its rule; the GPU rules with the GPU they asked for (gpu=1 ->
    # --gpus=1, a fake GPU here), the others without; resources from the workflow config reach sbatch
    shipped = yaml.safe_load(PROFILE.read_text())
    default_partition = shipped["default-resources"]["slurm_partition"]
    (gpu_partition,) = {shipped["set-resources"][r]["slurm_partition"] for r in shipped["set-resources"]}
    for job in jobs:
        rule = rule_of(job["Comment"])
        wanted = shipped["set-resources"].get(rule, {}).get("slurm_partition", default_partition)
        assert job["Partition"] == wanted, job
        assert ("gres/gpu=1" in job["AllocTRES"]) == (wanted == gpu_partition), job
    on_gpu = {rule_of(j["Comment"]) for j in jobs if j["Partition"] == gpu_partition}
    assert {"train_model", "fine_prune", "defend"} <= on_gpu, on_gpu
    smoke = yaml.safe_load(SMOKE.read_text())["resources"]
    hours, minutes = divmod(smoke["train_runtime_min"], 60)
    for job in jobs:
        if rule_of(job["Comment"]) == "train_model":
            assert f"mem={smoke['train_mem_mb']}M" in job["AllocTRES"], job
            assert job["Timelimit"] == f"{hours:02d}:{minutes:02d}:00", job

    # the same tables as the local run: training is deterministic on CPU with one thread per job, which both runs
    # use (train_threads 1); only wall-clock columns differ
    ours, theirs = work / "results" / "tables", smoke_workdir / "results" / "tables"
    names = sorted(p.name for p in theirs.glob("*.csv"))
    assert names and names == sorted(p.name for p in ours.glob("*.csv"))
    for name in names:
        assert read_table(ours / name) == read_table(theirs / name), name
