"""End-to-end runs of the real Snakefile on the smoke config, in a temporary working directory."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "config" / "smoke.yaml"

if os.environ.get("CI"):
    import snakemake  # noqa: F401  (CI must run these tests: a missing Snakemake fails, it does not skip)
else:
    pytest.importorskip("snakemake", reason="the workflow extra is not installed (pip install -e '.[workflow]')")
pytestmark = pytest.mark.e2e


def snakemake(workdir: Path, *args: str, configfile: Path = SMOKE, timeout: float = 600,
              check: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(workdir),
           "--configfile", str(configfile), "--cores", "2", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def write_config(path: Path, **changes) -> Path:
    cfg = yaml.safe_load(SMOKE.read_text())
    for dotted, value in changes.items():
        node = cfg
        *parents, last = dotted.split(".")
        for key in parents:
            node = node[key]
        node[last] = value
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def planned_jobs(proc: subprocess.CompletedProcess) -> dict[str, int]:
    """Parse the 'Job stats' table of a dry run."""
    text = proc.stdout + proc.stderr
    stats, inside = {}, False
    for line in text.splitlines():
        if line.startswith("Job stats"):
            inside = True
            continue
        if inside:
            parts = line.split()
            if len(parts) == 2 and parts[1].isdigit():
                if parts[0] == "total":
                    break
                stats[parts[0]] = int(parts[1])
    return stats


@pytest.fixture(scope="module")
def smoke_run(smoke_workdir: Path) -> Path:
    """The session's one finished smoke run (tests/conftest.py); a test that changes it works on a copy."""
    return smoke_workdir


def test_smoke_config_completes_with_every_output(smoke_run: Path):
    res = smoke_run / "results"
    for rel in ["tables/runs_synth.csv", "tables/attacks_synth.csv", "tables/attacks_synth.md",
                "tables/attacks_synth.tex", "tables/fine_pruning.csv", "tables/fine_pruning.md",
                "tables/routing_synth.md", "tables/precision_synth.md", "tables/detection_synth.md",
                "figures/asr_ba_vs_rate.png", "figures/prune_sweep.png", "figures/trigger_examples_synth.png",
                "figures/patch_maps_synth_pmoe.png", "figures/patch_values_synth_pmoe.png",
                "figures/fineprune_patch_maps_synth_pmoe.png", "figures/routing_synth.png",
                "figures/nc_masks_synth.png", "tables/merging_synth.md", "tables/merging_synth.html",
                "tables/merged_defense_synth.md", "tables/merged_defense_synth.html", "figures/msd_strategies.png"]:
        assert (res / rel).stat().st_size > 0, rel
    cfg = yaml.safe_load(SMOKE.read_text())
    attacks = len(cfg["attack"]["triggers"]) * len(cfg["attack"]["rates"])
    n_runs = cfg["seeds"]["clean"] + attacks * cfg["seeds"]["attack"]
    metrics = sorted(res.glob("synth/pmoe/*/seed*/metrics.json"))
    assert len(metrics) == n_runs
    for path in metrics:
        m = json.loads(path.read_text())
        assert 0.0 <= m["ba"] <= 100.0
        assert ("asr" in m) == (m["attack"] != "clean")
    # every rule wrote its log; training jobs wrote a benchmark file
    assert len(list((res / "logs" / "train_model").rglob("*.log"))) == n_runs
    assert len(list((res / "benchmarks" / "train_model").rglob("*.tsv"))) == n_runs
    table = (res / "tables" / "attacks_synth.md").read_text()
    for trigger in ("square", "blend", "warped"):
        assert f"| {trigger} |" in table
    # both fine-tuning sets, every deployment precision of every model, Neural Cleanse at two precisions
    fp = (res / "tables" / "fine_pruning.md").read_text()
    assert "| authors |" in fp and "| clean |" in fp
    deployed = [m for p in res.glob("synth/pmoe/*/seed*/deployed.json") for m in json.loads(p.read_text())]
    assert len(deployed) == 3 * n_runs and {m["precision"] for m in deployed} == {"fp32", "int8", "int4"}
    assert all(m["routing_change_clean"] == 0.0 for m in deployed if m["precision"] == "fp32")
    nc = list(res.glob("synth/pmoe/*/seed0/neural_cleanse/*.json"))
    assert len(nc) == 2 * (1 + len(cfg["attack"]["triggers"]) * len(cfg["neural_cleanse"]["rates"]))
    # the blindspot table: each detection defense on every analysed model at every precision
    assert (res / "tables/blindspot_synth.md").stat().st_size > 0 and (res / "figures/blindspot_synth.png").exists()
    bs = cfg["blindspot"]
    for defense in ("strip", "activation_clustering", "spectral_signatures"):
        found = list(res.glob(f"synth/pmoe/*/seed0/{defense}/*.json"))
        assert len(found) == len(bs["precisions"]) * (1 + len(bs["triggers"]) * len(bs["rates"])), defense
    # fine-tuning, a removal defense, on the attacked models only
    found = list(res.glob("synth/pmoe/*/seed0/fine_tuning/*.json"))
    assert len(found) == len(bs["precisions"]) * len(bs["triggers"]) * len(bs["rates"])
    assert "| Fine-tuning |" in (res / "tables/blindspot_synth.md").read_text()


def test_second_run_has_nothing_to_do(smoke_run: Path):
    proc = snakemake(smoke_run, "-n")
    assert "Nothing to be done" in proc.stdout + proc.stderr, proc.stdout[-2000:]


def test_fine_pruning_change_reruns_only_fine_pruning(smoke_run: Path, tmp_path: Path):
    # a copy of the finished run (copy2 keeps the mtimes Snakemake compares), so the shared one needs no re-run after
    work = tmp_path / "work"
    shutil.copytree(smoke_run, work, symlinks=True)
    cfg = write_config(tmp_path / "changed.yaml", **{"fine_pruning.epochs": 2})
    plan = planned_jobs(snakemake(work, "-n", configfile=cfg))
    assert plan.get("fine_prune") == 4, plan  # 2 prune rates x 2 fine-tuning sets
    assert "train_model" not in plan and "evaluate" not in plan and "poison" not in plan, plan
    # the merged models' Fine-Pruning (defend_merged) follows fine_pruning.epochs too, and the blindspot table
    # reads the fine-pruned models' deployed ASR
    assert set(plan) <= {"fine_prune", "fine_pruning_table", "fineprune_routing_maps", "deploy_eval_fine_pruned",
                         "precision_table", "defend_merged", "merged_defense_table", "blindspot_table",
                         "config_record", "all"}, plan
    weights = sorted((work / "results").glob("synth/pmoe/*/seed*/weights.safetensors"))  # trained models
    assert weights
    before = {p: p.stat().st_mtime_ns for p in weights}
    # only the Fine-Pruning table: the rules the dry run listed beside it read fine_pruning.epochs the same way
    snakemake(work, "--", "results/tables/fine_pruning.csv", configfile=cfg)
    assert {p: p.stat().st_mtime_ns for p in weights} == before, "training outputs must not be rewritten"
    fp = json.loads(next((work / "results").rglob("fineprune/clean/10/metrics.json")).read_text())
    assert len(fp["finetune_history"]) == 2


@pytest.mark.parametrize("change, expected", [
    ({"train.epochz": 3}, "epochz"),
    ({"train.precision": "fp16"}, "fp16"),
    ({"attack.triggers.square.size": "big"}, "big"),
    ({"fine_pruning.models": ["nope"]}, "nope"),
    ({"train.epoch": 3}, "config: unknown key 'train.epoch' (did you mean 'train.epochs'?)"),
    ({"fine_pruning.model_per_rate": "fresh"}, "= 2 attack seeds, but seeds.attack is 1"),
    ({"merging.defended_sets": ["nope"]}, "merging.defended_sets names 'nope', which is not in merging.sets"),
])
def test_broken_config_fails_fast_naming_the_problem(tmp_path: Path, change, expected):
    cfg = write_config(tmp_path / "broken.yaml", **change)
    t0 = time.perf_counter()
    proc = snakemake(tmp_path / "work", "-n", configfile=cfg, check=False, timeout=120)
    assert proc.returncode != 0
    assert expected in proc.stdout + proc.stderr, (proc.stdout + proc.stderr)[-3000:]
    assert time.perf_counter() - t0 < 60
    assert not (tmp_path / "work" / "results").exists()


def test_fresh_model_per_prune_rate_plans_fine_pruning_on_its_own_seeds(tmp_path: Path):
    cfg = write_config(tmp_path / "fresh.yaml", **{"fine_pruning.model_per_rate": "fresh", "seeds.attack": 2})
    proc = snakemake(tmp_path / "work", "-n", configfile=cfg, timeout=120)
    planned = set(re.findall(r"results/\S+/fineprune/\S+/metrics\.json", proc.stdout + proc.stderr))
    run = "results/synth/pmoe/square-10"
    assert planned == {f"{run}/seed0/fineprune/{v}/10/metrics.json" for v in ("authors", "clean")} | {
        f"{run}/seed1/fineprune/{v}/30/metrics.json" for v in ("authors", "clean")}  # run 0: rate j on seed j
    plan = planned_jobs(proc)
    assert plan["fine_prune"] == 4 and plan["prune_sweep"] == 2, plan  # the sweep on both models pruned


def test_killed_training_leaves_no_complete_looking_output(tmp_path: Path):
    # a training long enough to be killed mid-way
    cfg = write_config(tmp_path / "slow.yaml", **{"train.epochs": 400, "seeds.clean": 1, "attack.rates": [10],
                                                  "attack.triggers": {"square": {"kind": "square"}},
                                                  "fine_pruning.enabled": False, "fine_pruning.sweep": [],
                                                  "neural_cleanse.enabled": False, "merging.enabled": False})
    work = tmp_path / "work"
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(work), "--configfile",
           str(cfg), "--cores", "1", "results/synth/pmoe/clean/seed0/weights.safetensors"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    log = work / "results/logs/train_model/synth/pmoe/clean/seed0.log"
    deadline = time.time() + 180
    while time.time() < deadline and not (log.exists() and "epoch 2/" in log.read_text()):
        time.sleep(0.5)
    assert log.exists() and "epoch 2/" in log.read_text(), "training did not start"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    run = work / "results/synth/pmoe/clean/seed0"
    assert not (run / "weights.safetensors").exists()
    assert not (run / "history.json").exists()
    # Snakemake schedules the job again
    plan = planned_jobs(snakemake(work, "-n", "results/synth/pmoe/clean/seed0/weights.safetensors",
                                  configfile=cfg))
    assert plan.get("train_model") == 1, plan


def test_paper_config_is_the_default_and_plans_170_trainings(tmp_path: Path):
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(tmp_path), "-n", "--cores", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert planned_jobs(proc)["train_model"] == 170


# ----- the data a config points at ------------------------------------------------------------------------------

def tiny_npz(path: Path, seed: int = 0) -> Path:
    """A valid 4-class dataset file; every seed gives a file of the same size."""
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, x_train=rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8), y_train=np.arange(16) % 4,
             x_test=rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8), y_test=np.arange(8) % 4,
             classes=np.asarray(["a", "b", "c", "d"]))
    return path


def npz_config(path: Path, data_path: str) -> Path:
    """The smoke config with its one dataset read from an npz file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_config(path, **{"datasets": {"real": {"source": "npz", "path": data_path}},
                                 "fine_pruning.datasets": ["real"], "merging.datasets": ["real"],
                                 "compression_attack.datasets": ["real"]})


def test_replaced_data_file_reruns_prepare_data_even_with_its_old_mtime(tmp_path: Path):
    data = tiny_npz(tmp_path / "config" / "data" / "tiny.npz")
    cfg = npz_config(tmp_path / "config" / "npz.yaml", "data/tiny.npz")  # relative to the config's folder
    work, target = tmp_path / "work", "results/data/real.npz"
    snakemake(work, target, "--cores", "1", configfile=cfg)
    assert (work / target).is_file()
    unchanged = snakemake(work, "-n", target, configfile=cfg)
    assert "Nothing to be done" in unchanged.stdout + unchanged.stderr, planned_jobs(unchanged)
    # new content, same size, the old mtime put back: only the content digest can tell
    before = data.stat()
    tiny_npz(data, seed=1)
    os.utime(data, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert data.stat().st_size == before.st_size and data.stat().st_mtime_ns == before.st_mtime_ns
    replaced = snakemake(work, "-n", target, configfile=cfg)
    assert planned_jobs(replaced) == {"prepare_data": 1}, replaced.stdout[-2000:]
    assert "Params have changed" in replaced.stdout + replaced.stderr


def test_relative_data_paths_follow_the_config_file_that_sets_them(tmp_path: Path):
    shared = tiny_npz(tmp_path / "shared" / "data" / "tiny.npz")
    cfg = npz_config(tmp_path / "project" / "config" / "study.yaml", "../../shared/data/tiny.npz")
    site = tiny_npz(tmp_path / "site" / "other.npz")
    override = tmp_path / "site" / "paths.yaml"  # a second config file that holds only the path
    override.write_text(yaml.safe_dump({"datasets": {"real": {"path": "other.npz"}}}))
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"  # Snakemake started from a third folder
    work.mkdir()
    elsewhere.mkdir()
    from_cli = tiny_npz(work / "cli.npz")

    def plan(*args: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(work), "-n",
               "--cores", "1", "results/data/real.npz", *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=elsewhere)

    def planned_input(*args: str) -> str:
        proc = plan(*args)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return re.search(r"^\s*input: (.+)$", proc.stdout + proc.stderr, re.M).group(1)

    assert planned_input("--configfile", str(cfg)) == str(shared)
    assert planned_input("--configfile", str(cfg), str(override)) == str(site)  # the last file to set it wins
    # on the command line: from the working directory
    assert planned_input("--configfile", str(cfg), "--config", "datasets={real: {path: cli.npz}}") == str(from_cli)
    shared.unlink()
    missing = plan("--configfile", str(cfg))
    assert missing.returncode != 0 and str(shared) in missing.stdout + missing.stderr


def test_packed_training_gives_each_run_its_own_files(smoke_run: Path, tmp_path):
    """train.pack: 2 trains clean seeds 0 and 1 in one job; each run lands in its own folder with the files a job of
    its own writes (the smoke run's, pack 1), and the same training up to float rounding order (grouped kernels sum
    in another order, which 30 SGD steps amplify: the library tests pin the equivalence tighter,
    tests/test_packed.py)."""
    targets = [f"results/synth/pmoe/clean/seed{s}/{name}" for s in (0, 1) for name in ("weights.safetensors",
                                                                                         "history.json")]
    packed_cfg = write_config(tmp_path / "packed.yaml", **{"train.pack": 2})
    snakemake(tmp_path / "packed", *targets, configfile=packed_cfg)
    packed = tmp_path / "packed" / "results"
    assert (packed / "synth/pmoe/clean/packs/seeds0-1").is_dir()
    assert (packed / "logs/train_model/synth/pmoe/clean/seeds0-1.log").is_file()
    for seed in (0, 1):
        run = f"synth/pmoe/clean/seed{seed}/history.json"
        alone = json.loads((smoke_run / "results" / run).read_text())
        together = json.loads((packed / run).read_text())
        assert together["seed"] == alone["seed"] == seed
        assert len(together["epochs"]) == len(alone["epochs"]) and len(together["routing"]) == len(alone["routing"])
        first, first_alone = together["epochs"][0], alone["epochs"][0]
        assert first["train_loss"] == pytest.approx(first_alone["train_loss"], rel=1e-3)
        assert together["epochs"][-1]["test_acc"] == pytest.approx(alone["epochs"][-1]["test_acc"], abs=0.05)
    # a second run finds nothing to do: the links are complete outputs
    again = snakemake(tmp_path / "packed", *targets, configfile=packed_cfg)
    assert "Nothing to be done" in again.stdout + again.stderr


def test_smoke_compression_attack_table(smoke_run: Path):
    """every attack model of the smoke config trained, measured, checked by Neural Cleanse, in the table."""
    res = smoke_run / "results"
    cfg = yaml.safe_load(SMOKE.read_text())["compression_attack"]
    evaluations = sorted(res.glob("synth/pmoe/compression/*/seed*/evaluation.json"))
    assert len(evaluations) == len(cfg["variants"]) * len(cfg["targets"]) * cfg["seeds"]
    assert len(list(res.glob("synth/pmoe/compression/*/seed*/neural_cleanse/fp32.json"))) == len(evaluations)
    table = (res / "tables/compression_synth.md").read_text()
    labels = [f"{v} 8-bit" if v == "faithful" else v for v in cfg["variants"]]  # the smoke config's default bits
    assert all(f"| {label} |" in table for label in labels) and "ROC-AUC" in table


def test_blindspot_runs_neural_cleanse_on_every_seed_it_analyses(tmp_path: Path):
    """the blindspot table's Neural Cleanse rows cover the same models as its other defenses (here two
    clean seeds, though neural_cleanse.seeds is 1) at the precisions both blocks name; the compression table's
    ROC-AUC takes those clean models as negatives when they are run at fp32."""
    cfg = write_config(tmp_path / "blind.yaml", **{"blindspot.seeds": 2, "blindspot.precisions": ["fp32", "int8"]})
    proc = snakemake(tmp_path / "work", "-n", "--", "results/tables/blindspot_synth.csv",
                     "results/tables/compression_synth.csv", configfile=cfg, timeout=120)
    planned = set(re.findall(r"results/synth/pmoe/\S+/neural_cleanse/\S+\.json", proc.stdout + proc.stderr))
    blind = {f"results/synth/pmoe/{run}/neural_cleanse/{p}.json"
             for run in ("clean/seed0", "clean/seed1", "square-10/seed0") for p in ("fp32", "int8")}
    assert blind <= planned, sorted(blind - planned)
    # nothing for the triggers the blindspot block leaves out: those belong to the detection table only
    assert not any("/blend-" in p or "/warped-" in p for p in planned), sorted(planned)
    table_inputs = re.search(r"rule compression_attack_table:\n\s+input: ([^\n]+)", proc.stdout + proc.stderr)
    assert table_inputs and "clean/seed1/neural_cleanse/fp32.json" in table_inputs.group(1), proc.stdout[-3000:]
