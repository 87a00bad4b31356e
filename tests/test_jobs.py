"""Every job function of pmoe_backdoor.jobs on a small synthetic study: data, trigger, poison, a trained model,
then each job that reads them (the same chain the Snakefile runs, without Snakemake)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from pmoe_backdoor.attacks.poison import PoisonRecord
from pmoe_backdoor.jobs.analysis import routing_maps_job, routing_stats_job, trigger_examples_job
from pmoe_backdoor.jobs.common import JobData, RunId
from pmoe_backdoor.jobs.data import prepare_data
from pmoe_backdoor.jobs.defense import FinePruneJob, PruneSweepJob, fine_prune_job, prune_sweep_job
from pmoe_backdoor.jobs.deploy import DeployEvalJob, deploy_eval_job
from pmoe_backdoor.jobs.evaluate import evaluate_job
from pmoe_backdoor.jobs.poison import clean_record_file, make_poison_file, make_trigger_file, trigger_seed
from pmoe_backdoor.jobs.train import TrainJob, train_job
from pmoe_backdoor.models.checkpoint import load_model

MODEL = {"arch": "pmoe", "widen_factor": 1, "num_experts": 4, "top_k": 16, "bn_momentum": 0.1}
TRAIN = {"epochs": 1, "batch_size": 64, "lr": 0.05, "momentum": 0.9, "progress_seconds": 0}
RUN = RunId("synth", "pmoe", "square-10", 0)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> dict[str, str]:
    """data -> square trigger -> 10 % poison -> one trained model (one epoch, width 1)."""
    d = tmp_path_factory.mktemp("study")
    paths = {k: str(d / name) for k, name in (("data", "synth.npz"), ("trigger", "square.safetensors"),
                                               ("poison", "poison.safetensors"), ("weights", "w.safetensors"),
                                               ("history", "history.json"))}
    prepare_data({"source": "synthetic", "num_classes": 4, "n_train": 192, "n_test": 64, "seed": 0}, paths["data"])
    make_trigger_file("square", {"size": 4}, trigger_seed("square", 0, RUN.seed), paths["trigger"])
    make_poison_file(paths["data"], paths["trigger"], 10, RUN.seed, target=0, exclude_target=False,
                     out=paths["poison"])
    train_job(TrainJob(data=paths["data"], model=MODEL, train=TRAIN, seed=RUN.seed, out_weights=paths["weights"],
                       out_history=paths["history"], poison=paths["poison"], trigger=paths["trigger"], device="cpu",
                       probes=2))
    return paths


def test_prepare_data_writes_the_canonical_npz(study):
    job = JobData.open(study["data"], "cpu")
    assert job.x_train.shape == (192, 32, 32, 3) and job.x_train.dtype == torch.uint8
    assert job.num_classes == 4 and job.device == torch.device("cpu")


def test_poison_job_stores_int_rate_times_n_indices(study):
    rec = PoisonRecord.load(study["poison"])
    assert len(rec.indices) == int(0.10 * 192) and rec.target == 0


def test_clean_record_poisons_nothing(study, tmp_path):
    out = tmp_path / "clean.safetensors"
    clean_record_file(study["data"], str(out))
    job = JobData.open(study["data"], "cpu")
    x, y = PoisonRecord.load(out).apply(job.x_train, job.y_train)
    assert torch.equal(x, job.x_train) and torch.equal(y, job.y_train)


def test_trigger_seed_draws_a_new_warp_grid_per_run_but_one_blend_pattern():
    assert trigger_seed("warp", 0, 1) != trigger_seed("warp", 0, 2)
    assert trigger_seed("blend", 0, 1) == trigger_seed("blend", 0, 2)


def test_train_job_writes_weights_and_history(study):
    model, meta = load_model(study["weights"])
    assert meta["model"] == MODEL and meta["seed"] == RUN.seed
    history = json.loads(Path(study["history"]).read_text())
    assert len(history["epochs"]) == 1 and "test_acc" in history["epochs"][0]
    assert len(history["probe_names"]) == 4  # 2 probes and their triggered copies
    assert history["seed"] == RUN.seed


def test_train_job_is_reproducible_on_cpu(study, tmp_path):
    again = tmp_path / "w.safetensors"
    train_job(TrainJob(data=study["data"], model=MODEL, train=TRAIN, seed=RUN.seed, out_weights=str(again),
                       out_history=str(tmp_path / "h.json"), poison=study["poison"], trigger=study["trigger"],
                       device="cpu", probes=0))
    a, _ = load_model(study["weights"])
    b, _ = load_model(again)
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name


def test_train_job_with_router_evasion_trains_the_term_and_follows_the_trigger(study, tmp_path):
    """An adaptive attack's settings carry ``router_evasion``: the job trains with the term (weight 0: the same
    weights as the plain job) and its history follows ASR and the trigger's routing per epoch."""
    def run(weight: float) -> tuple[str, dict]:
        out = tmp_path / f"w{weight}.safetensors"
        train_job(TrainJob(data=study["data"], model=MODEL, train={**TRAIN, "router_evasion": {"weight": weight}},
                           seed=RUN.seed, out_weights=str(out), out_history=str(tmp_path / f"h{weight}.json"),
                           poison=study["poison"], trigger=study["trigger"], device="cpu", probes=2))
        return str(out), json.loads((tmp_path / f"h{weight}.json").read_text())

    baseline, _ = run(0.0)
    evasive, history = run(1.0)
    plain = load_model(study["weights"])[0].state_dict()
    assert all(torch.equal(x, plain[k]) for k, x in load_model(baseline)[0].state_dict().items())
    assert any(not torch.equal(x, plain[k]) for k, x in load_model(evasive)[0].state_dict().items())
    row = history["epochs"][-1]
    assert history["router_evasion"]["weight"] == 1.0 and row["train_evasion"] > 0
    assert {"test_acc", "asr", "expert_selection_rate", "defense_top_m_rate"} <= set(row)


def test_evaluate_job_reports_ba_asr_and_the_run(study, tmp_path):
    out = tmp_path / "metrics.json"
    m = evaluate_job(study["data"], study["weights"], str(out), study["trigger"], 0, 32, "cpu", RUN)
    assert json.loads(out.read_text()) == m
    assert 0 <= m["ba"] <= 100 and 0 <= m["asr"] <= 100 and m["n_asr"] == 48  # the non-target test images
    assert {k: m[k] for k in ("dataset", "model", "attack", "seed")} == RUN.as_dict()


def test_evaluate_job_without_trigger_has_no_asr(study, tmp_path):
    m = evaluate_job(study["data"], study["weights"], str(tmp_path / "m.json"), None, 0, 32, "cpu", RUN)
    assert "asr" not in m


def test_fine_prune_job_measures_three_stages_and_saves_weights(study, tmp_path):
    fp = {"epochs": 1, "lr": 0.05, "activation_images": 64, "mask": False}
    r = fine_prune_job(FinePruneJob(data=study["data"], weights=study["weights"], poison=study["poison"],
                                    trigger=study["trigger"], out=str(tmp_path / "m.json"),
                                    out_weights=str(tmp_path / "w.safetensors"), prune_rate=30.0,
                                    finetune_data="authors", fine_pruning=fp, train=TRAIN, target=0, device="cpu",
                                    run=RUN))
    assert set(r["before"]) == {"ca", "asr"} and len(r["finetune_history"]) == 1
    _, meta = load_model(tmp_path / "w.safetensors")
    assert meta["fine_pruned"] == 30.0
    pruned = r["pruned_channels"]
    assert len(pruned) == 4 and all(len(p) == len(pruned[0]) > 0 for p in pruned)


def test_prune_sweep_job_zero_rate_equals_the_model(study, tmp_path):
    rows = prune_sweep_job(PruneSweepJob(data=study["data"], weights=study["weights"], trigger=study["trigger"],
                                         poison=study["poison"], out=str(tmp_path / "s.json"), rates=[0.0, 90.0],
                                         activation_data="authors", activation_images=64, target=0, device="cpu",
                                         run=RUN))
    m = evaluate_job(study["data"], study["weights"], str(tmp_path / "m.json"), study["trigger"], 0, 32, "cpu", RUN)
    assert [r["prune_rate"] for r in rows] == [0.0, 90.0]
    assert rows[0]["ca"] == pytest.approx(m["ba"]) and rows[0]["asr"] == pytest.approx(m["asr"])


def test_routing_stats_job_counts_the_trigger_patch(study, tmp_path):
    r = routing_stats_job(study["data"], study["weights"], {"square": study["trigger"]}, str(tmp_path / "r.json"),
                          0, "cpu", RUN)
    stats = r["triggers"]["square"]
    assert stats["positions"] == [0]
    for images in ("triggered", "untriggered"):
        assert 0.0 <= stats[images]["reached_fraction"] <= 1.0


def test_routing_maps_job_and_trigger_examples(study, tmp_path):
    models = {"clean": {"weights": study["weights"], "trigger": None},
              "square": {"weights": study["weights"], "trigger": study["trigger"]}}
    r = routing_maps_job(study["data"], models, [1, 2], str(tmp_path / "maps.json"), "cpu")
    assert len(r["rows"]) == 4 and np.array(r["rows"][0]["maps"]).shape == (4, 8, 8)
    assert [row["triggered"] for row in r["rows"]] == [False, False, True, True]
    out = tmp_path / "examples.png"
    trigger_examples_job(study["data"], {"square": study["trigger"]}, [1, 2], str(out), "triggers")
    assert out.read_bytes()[:8] == PNG_MAGIC
    with pytest.raises(ValueError, match="class 9 has no test image"):
        routing_maps_job(study["data"], models, [9], str(tmp_path / "x.json"), "cpu")


def test_deploy_eval_job_at_each_precision(study, tmp_path):
    precisions = ["fp32", "int8", "int4", "int8_dynamic"]
    rows = deploy_eval_job(deployment(study, precisions, str(tmp_path / "d.json"), calibration=32,
                                      fine_pruned="authors 30 %"))
    assert [r["precision"] for r in rows] == precisions
    assert rows[0]["routing_change_clean"] == 0.0 and rows[0]["routing_change_triggered"] == 0.0
    assert rows[1]["calibration_images"] == 32 and rows[2]["calibration_images"] == 0
    # int8_dynamic quantizes the final Linear only: no calibration, and the routing (convolutions) is fp32's
    assert rows[3]["calibration_images"] == 0
    assert rows[3]["routing_change_clean"] == 0.0 and rows[3]["routing_change_triggered"] == 0.0
    assert all(r["fine_pruned"] == "authors 30 %" and r["seed"] == RUN.seed for r in rows)


def defend(study: dict[str, str], tmp_path: Path, defense: str, precision: str, config: dict, name: str,
           triggers: dict[str, str] | None = None, calibration: int = 16) -> dict:
    """The generic defense job on the study's model (target 0)."""
    from pmoe_backdoor.jobs.defend import DefenseJob, defense_job

    spec = DefenseJob(defense, study["data"], study["weights"], precision, RUN, config, calibration, 0,
                      triggers or {}, study["poison"])
    return defense_job(spec, str(tmp_path / f"{name}.json"), str(tmp_path / f"{name}.safetensors"), "cpu")


def test_neural_cleanse_job_writes_summary_and_masks(study, tmp_path):
    from pmoe_backdoor.io import load_tensors

    s = defend(study, tmp_path, "neural_cleanse", "fp32", {"optimizer": {"epochs": 1, "batch_size": 16},
                                                           "schedule": "fast", "classes": 2, "images": 32}, "nc",
               calibration=32)
    assert s["images"] == 32 and len(s["classes"]) == 2 and s["precision"] == "fp32"
    assert s["defense_name"] == "neural_cleanse" and s["target_found"] == s["detected_target"]
    masks, meta = load_tensors(tmp_path / "nc.safetensors")
    assert meta["classes"] == [0, 1] and masks["mask_0"].shape == (32, 32)


def test_merging_jobs_from_victims_to_table(study, tmp_path, monkeypatch):
    """finetune_victim -> msd_strategy -> merge_models -> select_candidate -> merging_table and strategy figure;
    then defend_merged -> merged_defense_table on the same merged models."""
    from pmoe_backdoor.jobs.merging import (
        DefendMergedJob,
        SelectCandidateJob,
        defend_merged_job,
        finetune_victim_job,
        merge_models_job,
        merged_defense_table,
        merging_table,
        select_candidate_job,
        strategy_figure,
        strategy_job,
    )
    from pmoe_backdoor.jobs.poison import clean_record_file

    clean = tmp_path / "clean.safetensors"
    clean_record_file(study["data"], str(clean))
    victims = {}
    for name, poison in (("benign", str(clean)), ("square", study["poison"])):
        victims[name] = str(tmp_path / f"{name}.safetensors")
        h = finetune_victim_job(study["data"], study["weights"], poison, {"epochs": 1, "batch_size": 64}, 0,
                                victims[name], str(tmp_path / f"{name}.json"), "cpu")
        assert h["ancestor"] == study["weights"] and len(h["epochs"]) == 1
    strategy = tmp_path / "n2.json"
    strategy_job(2, False, {}, {}, str(strategy))
    files = merge_models_job(list(victims.values()), str(strategy), "cyclic", str(tmp_path / "merged"))
    assert set(files) == {"WAG", "M_01", "M_10"}
    record = select_candidate_job(SelectCandidateJob(
        data=study["data"], victims=victims, triggers={"square": study["trigger"]}, merged=str(tmp_path / "merged"),
        holdout_per_class=5, holdout_seed=0, inversion={"steps": 5}, target=0, batch_size=32, device="cpu",
        identity={"dataset": "synth", "model": "pmoe", "set": "bs", "seed": 0, "coupling": "free"},
        out=str(tmp_path / "selection.json")))
    assert record["held_out"] == 20 and record["evaluated"] == 44  # 5 of each of the 4 classes held out
    assert record["chosen"] in ("M_01", "M_10") and set(record["models"]) == {"benign", "square", "WAG", "M_01",
                                                                               "M_10"}
    assert all(0 <= m["asr"]["square"] <= 100 for m in record["models"].values())
    out = {ext: str(tmp_path / f"merging.{ext}") for ext in ("csv", "md", "tex", "html")}
    summary = merging_table([str(tmp_path / "selection.json")], 0, out["csv"], out["md"], out["tex"], out["html"])
    assert list(summary.method) == ["victims", "WAG", "MSD (oracle)", "MSD (selected)"]
    assert "<table" in Path(out["html"]).read_text()
    strategy_figure([str(strategy)], ["2 models, free"], str(tmp_path / "s.png"))
    assert (tmp_path / "s.png").read_bytes()[:8] == PNG_MAGIC

    # defend_merged: WAG and the chosen candidate deployed and Fine-Pruned, fine-tuned on the held-out images only
    import pmoe_backdoor.defenses.merging.defend as defend
    from pmoe_backdoor.defenses.merging import holdout_split

    seen, real_fit = [], defend.fit

    def spy_fit(model, x, y, *args, **kwargs):
        seen.append(x)
        return real_fit(model, x, y, *args, **kwargs)

    monkeypatch.setattr(defend, "fit", spy_fit)
    defense = DefendMergedJob(
        data=study["data"], triggers={"square": study["trigger"]}, merged=str(tmp_path / "merged"),
        selection=str(tmp_path / "selection.json"), holdout_per_class=5, holdout_seed=0,
        precisions=["fp32", "int8", "int4"], calibration=32, prune_rates=[0.0, 50.0],
        fine_pruning={"epochs": 2, "lr": 0.01, "mask": False}, train=TRAIN, target=0, batch_size=32, device="cpu",
        identity={k: record[k] for k in ("dataset", "model", "set", "seed", "coupling")},
        out=str(tmp_path / "merged_defense.json"))
    with pytest.raises(ValueError, match="must be select_candidate's"):  # another held-out split: refused
        defend_merged_job(replace(defense, holdout_per_class=4, precisions=["fp32"], prune_rates=[],
                                  out=str(tmp_path / "x.json")))
    d = defend_merged_job(defense)
    assert d["chosen"] == record["chosen"] and d["calibration_images"] == 32
    assert d["models"]["MSD (selected)"]["name"] == record["chosen"]
    held, _ = holdout_split(JobData.open(study["data"]).y_test, 5, 0)
    x_held = JobData.open(study["data"]).x_test[torch.from_numpy(held)]
    assert len(seen) == 4 and all(torch.equal(x, x_held) for x in seen)  # 2 models x 2 rates
    for method, name in (("WAG", "WAG"), ("MSD (selected)", record["chosen"])):
        result, reference = d["models"][method], record["models"][name]
        assert list(result["precisions"]) == ["fp32", "int8", "int4"]
        # same split, same measurement as select_candidate
        assert result["precisions"]["fp32"]["ba"] == pytest.approx(reference["ba"])
        assert result["precisions"]["fp32"]["asr"]["square"] == pytest.approx(reference["asr"]["square"])
        rate0, rate50 = result["fine_pruning"]
        assert rate0["pruned_channels"] == [[]] * 4 and rate0["after_pruning"] == result["precisions"]["fp32"]
        assert all(len(c) == len(rate50["pruned_channels"][0]) > 0 for c in rate50["pruned_channels"])
        assert rate50["finetune_steps"] == 2 and len(rate50["finetune_loss"]) == 2  # 20 images, batch 64
    out = {ext: str(tmp_path / f"defended.{ext}") for ext in ("csv", "md", "tex", "html")}
    summary = merged_defense_table([str(tmp_path / "merged_defense.json")], out["csv"], out["md"], out["tex"],
                                   out["html"])
    assert list(summary.condition.unique()) == ["fp32", "int8", "int4", "pruned 0 %", "fine-pruned 0 %",
                                                "pruned 50 %", "fine-pruned 50 %"]
    assert set(summary.method) == {"WAG", "MSD (selected)"} and "<table" in Path(out["html"]).read_text()


def test_blindspot_jobs_from_defenses_to_table(study, tmp_path):
    """strip / activation_clustering / spectral_signatures / fine_tuning through the generic defense job on the
    study's model, then the blindspot table and figure."""
    from pmoe_backdoor.jobs.blindspot import blindspot_figure, blindspot_table

    rec = PoisonRecord.load(study["poison"])
    trigger = {"square": study["trigger"]}
    strip_cfg = {"overlays": 4, "holdout": 20, "test_images": 30, "frr": 0.05, "flag_rate": 0.5,
                 "superimpose": "add", "batch_size": 64, "threshold": "empirical"}
    s = defend(study, tmp_path, "strip", "int8", strip_cfg, "s", trigger)
    assert s["precision"] == "int8" and s["defense"] == "STRIP" and set(s["triggers"]) == {"square"}
    assert 0 <= s["frr"] <= 1 and isinstance(s["flagged"], bool) and s["target_found"] is None
    with pytest.raises(ValueError, match="exceeds the 64 test images"):
        defend(study, tmp_path, "strip", "fp32", {**strip_cfg, "holdout": 40}, "x", trigger)
    a = defend(study, tmp_path, "activation_clustering", "int4",
               {"dims": 10, "size_threshold": 0.35, "silhouette_threshold": 0.5, "restarts": 2,
                "silhouette_samples": 100, "batch_size": 64}, "a")
    assert a["precision"] == "int4" and a["poisoned"] == len(rec.indices) and a["target"] == 0
    assert a["feature_dims"] == 64  # the head's input: 4 experts x 16 channels at widen 1
    assert sum(r["samples"] for r in a["labels"]) == 192
    assert a["target_found"] == (0 in a["flagged_labels"])
    sp = defend(study, tmp_path, "spectral_signatures", "fp32",
                {"epsilon": None, "removal": 1.5, "anomaly_threshold": 2.0, "batch_size": 500}, "p")
    # epsilon: the poisoned share of label 0 in the poisoned set
    y = JobData.open(study["data"]).y_train.clone()
    y[rec.indices] = 0
    assert sp["epsilon"] == pytest.approx(len(rec.indices) / int((y == 0).sum()))
    ft = defend(study, tmp_path, "fine_tuning", "fp32",
                {"images": 64, "epochs": 1, "lr": 0.01, "batch_size": 32, "momentum": 0.9, "weight_decay": 0.0,
                 "removal_asr": 20, "eval_batch_size": 64}, "f", trigger)
    assert ft["images"] == 64 and ft["flagged"] == (ft["asr_after"] < 20) and ft["target_found"] is None
    deployed = str(tmp_path / "deployed.json")
    deploy_eval_job(deployment(study, ["fp32", "int8", "int4"], deployed, calibration=16))
    # before fine-tuning, the fp32 model as deploy_eval measures it
    assert ft["asr_before"] == pytest.approx(read_json_list(deployed)[0]["asr"])
    fine_pruned = str(tmp_path / "fp_deployed.json")
    deploy_eval_job(deployment(study, ["fp32", "int8"], fine_pruned, calibration=16, fine_pruned="authors 30 %"))
    out = {ext: str(tmp_path / f"blindspot.{ext}") for ext in ("csv", "md", "tex", "html")}
    summary = blindspot_table([str(tmp_path / f) for f in ("s.json", "a.json", "p.json", "f.json")], [deployed],
                              [fine_pruned], 20.0, "gtsrb", out["csv"], out["md"], out["tex"], out["html"])
    rows = {(r["defense"], r["precision"]): r for r in summary.to_dict("records")}
    assert set(rows) == {("STRIP", "int8"), ("Activation Clustering", "int4"), ("Spectral Signatures", "fp32"),
                         ("Fine-tuning", "fp32"), ("Fine-Pruning (authors 30 %)", "fp32"),
                         ("Fine-Pruning (authors 30 %)", "int8")}
    measured = {r["precision"]: r for r in read_json_list(deployed)}
    assert rows[("STRIP", "int8")]["asr_mean"] == pytest.approx(measured["int8"]["asr"])
    assert rows[("STRIP", "int8")]["detected_mean"] == 100.0 * s["flagged"]
    assert rows[("Fine-tuning", "fp32")]["asr_after_mean"] == pytest.approx(ft["asr_after"])
    fp = rows[("Fine-Pruning (authors 30 %)", "int8")]  # the same weights: "detected" iff its ASR is below 20 %
    assert fp["detected_mean"] == 100.0 * (measured["int8"]["asr"] < 20.0)
    blindspot_figure([out["csv"]], str(tmp_path / "blindspot.png"))
    assert (tmp_path / "blindspot.png").read_bytes()[:8] == PNG_MAGIC
    assert "Pandey" in Path(out["md"]).read_text()


def deployment(study: dict[str, str], precisions: list[str], out: str, calibration: int,
               fine_pruned: str | None = None) -> DeployEvalJob:
    """deploy_eval of the study's model with its trigger (target 0, batch 32)."""
    return DeployEvalJob(data=study["data"], weights=study["weights"], precisions=precisions, out=out,
                         trigger=study["trigger"], calibration=calibration, target=0, batch_size=32, device="cpu",
                         run=RUN, fine_pruned=fine_pruned)


def read_json_list(path: str) -> list[dict]:
    return json.loads(Path(path).read_text())
