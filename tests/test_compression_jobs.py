"""The compression-attack jobs on a small synthetic dataset, in the style of test_jobs.py: train an
attack model, measure it, Neural Cleanse on it (the deploy stage's job), and the table."""

from __future__ import annotations

import pytest

from pmoe_backdoor.attacks.triggers import SquareTrigger, load_trigger
from pmoe_backdoor.io import read_json
from pmoe_backdoor.jobs.common import RunId
from pmoe_backdoor.jobs.compression import (
    CompressionAttackJob,
    CompressionEvalJob,
    compression_attack_job,
    compression_eval_job,
)
from pmoe_backdoor.jobs.data import prepare_data
from pmoe_backdoor.jobs.defend import DefenseJob, defense_job
from pmoe_backdoor.models.checkpoint import load_model
from pmoe_backdoor.reporting.compression import compression_table, roc_auc, row_sentence

pytestmark = pytest.mark.usefixtures("one_thread")  # two torch threads contend on the shared 2-core machine

MODEL = {"arch": "pmoe", "widen_factor": 1, "num_experts": 4, "top_k": 16, "bn_momentum": 0.5}
ATTACK = {"epochs": 2, "batch_size": 128, "lr": 0.05, "eval_batch_size": 500}
TRIGGER = {"size": 6, "value": 255, "row": 24, "col": 24}
FP = {"rates": [10, 30], "epochs": 1, "lr": 0.05, "activation_images": 64}
FINETUNE = {"batch_size": 64, "progress_seconds": 0}


@pytest.fixture(scope="module")
def attack(tmp_path_factory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("compression")
    paths = {k: str(d / k) for k in ("data.npz", "w.safetensors", "h.json", "t.safetensors", "eval.json",
                                     "nc.json", "nc.safetensors")}
    prepare_data({"source": "synthetic", "num_classes": 4, "n_train": 128, "n_test": 48, "seed": 0},
                 paths["data.npz"])
    compression_attack_job(attack_job(paths["data.npz"], dict(ATTACK, variant="faithful"), 1, calibration=32,
                                      run=RunId("synth", "pmoe", "faithful-1", 0), out_weights=paths["w.safetensors"],
                                      out_history=paths["h.json"], out_trigger=paths["t.safetensors"]))
    return paths


def attack_job(data: str, attack_cfg: dict, target: int, calibration: int, run: RunId, out_weights: str,
               out_history: str, out_trigger: str) -> CompressionAttackJob:
    """An attack model of MODEL with the square TRIGGER, kept by the rule max fp32 ASR 20 %, BA tolerance 0.5."""
    return CompressionAttackJob(data=data, model=MODEL, attack=attack_cfg, trigger=TRIGGER, target=target,
                                calibration=calibration, max_fp32_asr=20, ba_tolerance=0.5, device="cpu", run=run,
                                out_weights=out_weights, out_history=out_history, out_trigger=out_trigger)


def test_attack_job_keeps_the_chosen_epoch_and_its_trigger(attack):
    h = read_json(attack["h.json"])
    assert [r["epoch"] for r in h["epochs"]] == [1, 2]
    assert h["chosen_epoch"] in (1, 2) and isinstance(h["rule_met"], bool)
    assert h["variant"] == "faithful" and h["target"] == 1 and h["config"]["momentum"] == 0.4
    assert all({"fp32_ba", "fp32_asr", "compressed_ba", "compressed_asr"} <= set(r) for r in h["epochs"])
    model, meta = load_model(attack["w.safetensors"])
    assert meta["epoch"] == h["chosen_epoch"] and meta["compression_attack"] == "faithful"
    assert load_trigger(attack["t.safetensors"]) == SquareTrigger(size=6, value=255, row=24, col=24)


def test_attack_job_rejects_a_target_outside_the_classes(attack, tmp_path):
    with pytest.raises(ValueError, match="target 7"):
        compression_attack_job(attack_job(attack["data.npz"], ATTACK, 7, 16, RunId("synth", "pmoe", "faithful-7", 0),
                                          str(tmp_path / "w"), str(tmp_path / "h"), str(tmp_path / "t")))


def test_prune_unknown_attack_job(attack, tmp_path):
    out = {n: str(tmp_path / n) for n in ("w", "h", "t")}
    h = compression_attack_job(attack_job(attack["data.npz"], dict(ATTACK, epochs=1, variant="prune_unknown"), 2, 32,
                                          RunId("synth", "pmoe", "prune_unknown-2", 3), out["w"], out["h"], out["t"]))
    assert h["variant"] == "prune_unknown" and h["target"] == 2 and h["chosen_epoch"] == 1
    assert h["config"]["prune_lower"] == 10.0 and h["config"]["alpha"] == 0.1
    assert load_model(out["w"])[1]["compression_attack"] == "prune_unknown"


def test_eval_job_measures_every_compression(attack):
    r = compression_eval_job(CompressionEvalJob(
        data=attack["data.npz"], weights=attack["w.safetensors"], trigger=attack["t.safetensors"],
        history=attack["h.json"], target=1, calibration=32, fine_pruning=FP, finetune=FINETUNE, batch_size=500,
        device="cpu", run=RunId("synth", "pmoe", "faithful-1", 0), out=attack["eval.json"]))
    assert r == read_json(attack["eval.json"])
    for name in ("fp32", "trained_bits", "int8_faithful", "int8_matched", "int4"):
        assert 0 <= r[name]["ba"] <= 100 and 0 <= r[name]["asr"] <= 100
    assert r["bits"] == 8 and r["trained_bits"].items() <= r["int8_faithful"].items()  # trained at int8: one deployer
    for name in ("int8_faithful", "int8_matched"):
        assert 0 <= r[name]["routing_flip_triggered"] <= 1
    assert [f["rate"] for f in r["fine_pruning"]] == [10.0, 30.0]
    assert all({"pruned", "finetuned"} <= set(f) for f in r["fine_pruning"])
    assert r["variant"] == "faithful" and r["chosen_epoch"] in (1, 2)


def test_table_from_evaluations_and_neural_cleanse(attack, tmp_path):
    if not read_json(attack["eval.json"]).get("fine_pruning"):
        pytest.skip("needs test_eval_job_measures_every_compression's output")
    defense_job(DefenseJob("neural_cleanse", attack["data.npz"], attack["w.safetensors"], "fp32",
                           RunId("synth", "pmoe", "faithful-1", 0), {"optimizer": {"epochs": 1, "batch_size": 16},
                                                                     "schedule": "fast", "classes": 2, "images": 16},
                           16, 1),
                attack["nc.json"], attack["nc.safetensors"], "cpu")
    out = {k: str(tmp_path / f"t.{k}") for k in ("csv", "md", "tex", "html")}
    df = compression_table([attack["eval.json"]], [attack["nc.json"]], [attack["nc.json"]], out["csv"], out["md"],
                           out["tex"], out["html"])
    assert len(df) == 1 and df.loc[0, "variant"] == "faithful"
    md = open(out["md"]).read()
    assert "FP30+FT ASR" in md and "synth: 0.50 (1 attack vs 1 clean models)" in md  # identical scores: AUC 0.5
    assert "Compression-activated backdoors" in open(out["html"]).read()


def test_roc_auc_and_row_sentences():
    assert roc_auc([3, 4], [1, 2]) == 1.0 and roc_auc([1], [2]) == 0.0 and roc_auc([1, 2], [2]) == 0.25
    assert roc_auc([], [1]) != roc_auc([], [1])  # NaN without both kinds
    row = {"fp32_asr": 3.0, "int8_faithful_asr": 95.0, "int8_matched_asr": 40.0, "int4_asr": 99.0, "fp_rates": [10],
           "fp10_asr": 12.0}
    assert row_sentence(row) == "clean-looking at fp32 (ASR 3.0 %), backdoored after int8-a, int4"
    assert row_sentence(dict(row, fp32_asr=50.0)).startswith("not stealthy")
    quiet = dict(row, int8_faithful_asr=10.0, int4_asr=20.0)
    assert "no compression activates it: highest ASR 40.0 % (int8-m)" in row_sentence(quiet)
