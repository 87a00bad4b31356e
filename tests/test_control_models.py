"""The source papers' architectures (VGG with BN, PreAct-ResNet-18) as registered models: their published parameter
counts, the model contract, and the stages that apply to a model without routers run on them end to end (train,
evaluate, deploy at every precision, every registered defense through the generic job)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from pmoe_backdoor.defenses import DEFENSES
from pmoe_backdoor.jobs.common import RunId
from pmoe_backdoor.jobs.data import prepare_data
from pmoe_backdoor.jobs.defend import DefenseJob, defense_job
from pmoe_backdoor.jobs.deploy import DeployEvalJob, deploy_eval_job
from pmoe_backdoor.jobs.evaluate import evaluate_job
from pmoe_backdoor.jobs.poison import make_poison_file, make_trigger_file
from pmoe_backdoor.jobs.train import TrainJob, train_job
from pmoe_backdoor.models import MODELS
from pmoe_backdoor.models.architectures import build_model, count_parameters
from pmoe_backdoor.models.checkpoint import load_model

CONTROLS = {"vgg": {"arch": "vgg", "depth": 11, "width": 0.125}, "preact_resnet18": {"arch": "preact_resnet18",
                                                                                     "width": 0.125}}
TRAIN = {"epochs": 1, "batch_size": 64, "lr": 0.05, "momentum": 0.9, "progress_seconds": 0}


@pytest.mark.parametrize("name, config, params", [
    ("vgg", {"depth": 11}, 9_231_114), ("vgg", {"depth": 16}, 14_728_266), ("preact_resnet18", {}, 11_171_146)])
def test_published_parameter_counts_at_full_width(name, config, params):
    assert count_parameters(build_model(name, 10, **config)) == params


@pytest.mark.parametrize("name", ["vgg", "preact_resnet18"])
def test_control_models_keep_the_model_contract(name):
    model = build_model(name, 7, width=0.25).eval()
    x = torch.rand(3, 3, 32, 32)
    logits = model(x)
    assert logits.shape == (3, 7) and isinstance(model.head.fc, torch.nn.Linear)
    routed_logits, routing = model(x, return_routing=True)
    assert routing is None and torch.equal(routed_logits, logits)
    assert not (MODELS[name].routing or MODELS[name].prunable_channels)
    assert MODELS[name].module_slots == (name == "preact_resnet18")  # merging's slot table exists for it
    # the width multiplier scales every layer: a quarter width has roughly a sixteenth of the weights
    assert count_parameters(model) < count_parameters(build_model(name, 7)) / 10


def test_bad_control_settings_name_the_key():
    with pytest.raises(ValueError, match="vgg depth"):
        build_model("vgg", 10, depth=13)
    with pytest.raises(ValueError, match="width"):
        build_model("preact_resnet18", 10, width=0.0)


@pytest.fixture(scope="module")
def attacked(tmp_path_factory) -> dict[str, str]:
    """Synthetic data, a square trigger at 10 %, and each control trained one epoch on it."""
    d = tmp_path_factory.mktemp("controls")
    paths = {"data": str(d / "synth.npz"), "trigger": str(d / "square.safetensors"),
             "poison": str(d / "poison.safetensors")}
    prepare_data({"source": "synthetic", "num_classes": 4, "n_train": 192, "n_test": 64, "seed": 0}, paths["data"])
    make_trigger_file("square", {"size": 4, "value": 255}, 0, paths["trigger"])
    make_poison_file(paths["data"], paths["trigger"], 10, 0, target=0, exclude_target=False, out=paths["poison"])
    for name, model in CONTROLS.items():
        paths[name] = str(d / f"{name}.safetensors")
        train_job(TrainJob(data=paths["data"], model=model, train=TRAIN, seed=0, out_weights=paths[name],
                           out_history=str(d / f"{name}.json"), poison=paths["poison"], trigger=paths["trigger"],
                           device="cpu", probes=0))
    return paths


@pytest.mark.parametrize("name", list(CONTROLS))
def test_every_stage_without_routers_runs_on_the_controls(attacked, name, tmp_path):
    model, meta = load_model(attacked[name])
    assert meta["model"] == CONTROLS[name]
    run = RunId("synth", name, "square-10", 0)
    metrics = evaluate_job(attacked["data"], attacked[name], str(tmp_path / "m.json"), attacked["trigger"], 0, 32,
                           "cpu", run)
    assert 0 <= metrics["ba"] <= 100 and 0 <= metrics["asr"] <= 100
    rows = deploy_eval_job(DeployEvalJob(data=attacked["data"], weights=attacked[name],
                                         precisions=["fp32", "int8", "int4", "int8_dynamic"],
                                         out=str(tmp_path / "d.json"), calibration=32, trigger=attacked["trigger"],
                                         target=0, batch_size=32, device="cpu", run=run))
    assert [r["precision"] for r in rows] == ["fp32", "int8", "int4", "int8_dynamic"]
    assert rows[0]["ba"] == pytest.approx(metrics["ba"]) and "routing_change_clean" not in rows[0]
    configs = {"strip": {"overlays": 4, "holdout": 20, "test_images": 30, "frr": 0.05, "flag_rate": 0.5,
                         "superimpose": "add", "batch_size": 64, "threshold": "empirical"},
               "activation_clustering": {"dims": 4, "size_threshold": 0.35, "silhouette_threshold": 0.5,
                                         "restarts": 2, "silhouette_samples": 100, "batch_size": 64},
               "spectral_signatures": {"epsilon": None, "removal": 1.5, "anomaly_threshold": 2.0, "batch_size": 64},
               "neural_cleanse": {"optimizer": {"epochs": 1, "batch_size": 16}, "schedule": "fast", "classes": 2,
                                  "images": 16},
               "fine_tuning": {"images": 64, "epochs": 1, "lr": 0.01, "batch_size": 32, "momentum": 0.9,
                               "weight_decay": 0.0, "removal_asr": 20, "eval_batch_size": 64},
               # the router's test does not apply to a model without routers (the plan does not run it there)
               "router_ablation": {"holdout": 20, "test_images": 30, "frr": 0.05},
               "saliency_ablation": {"holdout": 20, "test_images": 30, "frr": 0.05}}
    assert set(configs) == set(DEFENSES)
    base = DefenseJob("strip", attacked["data"], attacked[name], "int8", run, {}, 16, 0,
                      {"square": attacked["trigger"]}, attacked["poison"])
    for defense, config in configs.items():
        summary = defense_job(replace(base, defense=defense, config=config), str(tmp_path / f"{defense}.json"),
                              str(tmp_path / f"{defense}.safetensors"), "cpu")
        assert summary["model"] == name and summary["precision"] == "int8" and isinstance(summary["flagged"], bool)
        assert summary.get("applicable", True) == (defense != "router_ablation")
