"""The DAG as Snakemake builds it from the real Snakefile (no job runs): every config the schema accepts builds,
without torch; each job is given what it reads; every GPU job reaches the cluster's GPU partition."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "config" / "smoke.yaml"
PROBE = Path(__file__).parent / "tools" / "dag_probe.py"
SLURM = REPO / "profiles" / "slurm" / "config.yaml"

if os.environ.get("CI"):
    import snakemake  # noqa: F401  (CI must run these tests: a missing Snakemake fails, it does not skip)
else:
    pytest.importorskip("snakemake", reason="the workflow extra is not installed (pip install -e '.[workflow]')")
pytestmark = pytest.mark.e2e


def overlay(tmp_path: Path, name: str, changes: dict) -> Path:
    """A config file holding only ``changes``, given after the smoke config (Snakemake merges it in)."""
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(changes))
    return path


def dag(tmp_path: Path, *configfiles: Path) -> dict:
    """Every job (rule, wildcards, params, resources) and every rule's resources of the smoke DAG."""
    out, work = tmp_path / "dag.json", tmp_path / "work"
    args = ["-s", str(REPO / "Snakefile"), "-d", str(work), "--cores", "1", "--configfile", str(SMOKE),
            *map(str, configfiles)]
    proc = subprocess.run([sys.executable, str(PROBE), str(out), *args], capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    return json.loads(out.read_text())


def params_of(jobs: list[dict], rule: str) -> dict:
    return {tuple(j["output"]): j["params"] for j in jobs if j["rule"] == rule}


@pytest.fixture(scope="module")
def smoke_dag(tmp_path_factory) -> dict:
    return dag(tmp_path_factory.mktemp("smoke-dag"))


def neural_cleanse_jobs(dump: dict) -> list[dict]:
    return [j for j in dump["jobs"] if j["params"].get("defense") == "neural_cleanse"]


def test_every_neural_cleanse_rule_gets_the_schedule(smoke_dag: dict, tmp_path: Path):
    changed = dag(tmp_path, overlay(tmp_path, "original", {"neural_cleanse": {"schedule": "original"}}))
    nc_jobs = neural_cleanse_jobs(changed)
    # the compression study's, besides the detection and blindspot tables'
    assert {j["rule"] for j in nc_jobs} == {"defend", "compression_neural_cleanse"}
    assert all(j["params"]["config"]["schedule"] == "original" for j in nc_jobs)
    assert all(j["params"]["config"]["schedule"] == "fast" for j in neural_cleanse_jobs(smoke_dag))


def test_a_change_of_train_epochs_reruns_no_job_that_overrides_them(smoke_dag: dict, tmp_path: Path):
    changed = dag(tmp_path, overlay(tmp_path, "epochs", {"train": {"epochs": 7, "lr": 0.2}}))
    for rule in ("evaluate_compression_attack", "defend_merged", "fine_prune"):
        before, after = params_of(smoke_dag["jobs"], rule), params_of(changed["jobs"], rule)
        assert before and before == after, rule
    assert params_of(changed["jobs"], "train_model") != params_of(smoke_dag["jobs"], "train_model")


def test_every_gpu_rule_goes_to_the_gpu_partition(smoke_dag: dict, tmp_path: Path):
    """From the rules' resources as Snakemake resolved them (`use rule` copies inherit theirs), packed training
    included."""
    packed = dag(tmp_path, overlay(tmp_path, "pack", {"train": {"pack": 2}}))
    gpu_rules = {name for dump in (smoke_dag, packed) for name, resources in dump["rules"].items()
                 if "gpu" in resources}
    assert {"train_model", "train_pack", "fine_prune", "defend", "compression_neural_cleanse"} <= gpu_rules
    # the model evaluations too: without a GPU slot of their own they would all run on the first GPU
    assert {"evaluate", "deploy_eval", "deploy_eval_fine_pruned", "prune_sweep", "routing_stats", "routing_maps",
            "fineprune_routing_maps"} <= gpu_rules
    profile = yaml.safe_load(SLURM.read_text())
    cpu_partition = profile["default-resources"]["slurm_partition"]
    for rule in gpu_rules:
        settings = profile["set-resources"].get(rule)
        assert settings, f"profiles/slurm: GPU rule {rule!r} has no set-resources entry (it would run on CPU nodes)"
        assert settings["slurm_partition"] != cpu_partition, rule
        # the GPU itself is requested by the rule's own gpu=1 (the plugin turns it into --gpus=1); a gres as well
        # would ask twice
        assert "gres" not in settings, rule
        # runtime and memory come from the workflow config, not fixed numbers in the profile
        assert not {"runtime", "mem_mb"} & set(settings), rule
    # and nothing else is sent to the GPU partition (train_model with train.pack > 1 only links a packed job's run)
    assert set(profile["set-resources"]) <= gpu_rules


def test_every_rule_given_a_device_asks_for_a_gpu(smoke_dag: dict):
    """The scripts' job_context claims a GPU slot exactly for a rule with the gpu resource and computes on the CPU
    otherwise: a rule given params.device without that resource would not run where the config says."""
    with_device = {j["rule"] for j in smoke_dag["jobs"] if "device" in j["params"]}
    assert {"train_model", "evaluate", "deploy_eval", "routing_maps", "select_candidate"} <= with_device
    assert sorted(rule for rule in with_device if "gpu" not in smoke_dag["rules"][rule]) == []
    # and each of them says how many jobs may share a GPU, which the claim needs
    assert sorted({j["rule"] for j in smoke_dag["jobs"] if "device" in j["params"]
                   and "jobs_per_gpu" not in j["params"]}) == []


def dry_run(workdir: Path, *configfiles: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(workdir), "-n", "--cores", "1",
           "--configfile", *map(str, configfiles)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)


def optional_blocks() -> list[str]:
    schema = yaml.safe_load((REPO / "config" / "schema.yaml").read_text())
    return [key for key in schema["properties"] if key not in schema["required"]]


def test_every_optional_block_can_be_left_out(tmp_path: Path):
    """A schema-valid config without any one optional block builds its DAG, or stops with one `config:` line
    (a block another one needs); never a traceback while the rules are read."""
    smoke = yaml.safe_load(SMOKE.read_text())
    blocks = optional_blocks()
    assert {"analysis", "routing_probes", "fine_pruning", "merging", "blindspot"} <= set(blocks)

    def without(block: str) -> tuple[str, subprocess.CompletedProcess]:
        cfg = {k: v for k, v in smoke.items() if k != block}
        path = tmp_path / f"without-{block}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        return block, dry_run(tmp_path / f"work-{block}", path)

    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(without, blocks))
    built = []
    for block, proc in results:
        text = proc.stdout + proc.stderr
        if proc.returncode == 0:
            built.append(block)
        else:
            lines = [ln for ln in text.splitlines() if "config: " in ln]
            assert lines and "Traceback" not in text and "KeyError" not in text, f"without {block}:\n{text[-2000:]}"
    assert {"analysis", "routing_probes", "fine_pruning", "merging", "strip"} <= set(built), built


def test_the_dag_builds_without_torch(tmp_path: Path):
    """Snakemake imports the workflow's library at every start (and twice per cluster job): no torch there."""
    blocker = tmp_path / "blocker" / "torch"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('torch imported while the DAG was built')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(blocker.parent), os.environ.get("PYTHONPATH", "")]))
    proc = dry_run(tmp_path / "work", SMOKE, env=env)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    # the blocker works: importing torch with it fails
    check = subprocess.run([sys.executable, "-c", "import torch"], env=env, capture_output=True, text=True)
    assert "torch imported while the DAG was built" in check.stderr


def test_merging_plans_for_a_preact_resnet18(tmp_path: Path):
    """merging.model of arch preact_resnet18: its victims, strategies of its own architecture, the free coupling
    only (without routers, tied would repeat it) and no Fine-Pruning of the merged models (no expert channels)."""
    changes = {"models": {"resnet": {"arch": "preact_resnet18", "width": 0.125}}, "merging": {"model": "resnet"}}
    jobs = dag(tmp_path, overlay(tmp_path, "resnet", changes))["jobs"]
    strategies = sorted((j["wildcards"]["arch"], j["wildcards"]["n"], j["wildcards"]["coupling"])
                        for j in jobs if j["rule"] == "msd_strategy")
    assert strategies == [("preact_resnet18", "2", "free"), ("preact_resnet18", "3", "free")]
    merging = [j for j in jobs if j["rule"] in ("finetune_victim", "merge_models", "select_candidate", "defend_merged")]
    assert {j["rule"] for j in merging} == {"finetune_victim", "merge_models", "select_candidate", "defend_merged"}
    assert {j["wildcards"]["model"] for j in merging} == {"resnet"}
    assert {j["wildcards"]["coupling"] for j in merging if "coupling" in j["wildcards"]} == {"free"}
    assert len([j for j in merging if j["rule"] == "merge_models"]) == 3  # the smoke config's three sets, one seed
    defended = [j for j in merging if j["rule"] == "defend_merged"]
    assert defended and all(j["params"]["prune_rates"] == [] for j in defended)
