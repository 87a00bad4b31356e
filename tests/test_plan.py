"""Tests of pmoe_backdoor.plan and config_check.check_study: which jobs a config plans and what each is given,
in plain Python (no Snakemake run, no torch)."""

from __future__ import annotations

import copy
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

pytest.importorskip("snakemake", reason="the workflow extra is not installed (pip install -e '.[workflow]')")

from pmoe_backdoor.config_check import ConfigError, validate_config  # noqa: E402
from pmoe_backdoor.plan import Plan  # noqa: E402
from pmoe_backdoor.study_checks import check_study  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SCHEMA = REPO / "config" / "schema.yaml"


def load(name: str, **changes) -> dict:
    """A shipped config with dotted keys set (value None: removed), validated (defaults filled in) and checked."""
    cfg = copy.deepcopy(yaml.safe_load((REPO / "config" / f"{name}.yaml").read_text()))
    for key, value in changes.items():
        *parents, last = key.split(".")
        node = cfg
        for part in parents:
            node = node[part]
        if value is None:
            node.pop(last, None)
        else:
            node[last] = value
    validate_config(cfg, SCHEMA)
    check_study(cfg)
    return cfg


def test_paper_config_plans_170_trainings_and_its_fine_pruning():
    plan = Plan(load("config"))
    runs = plan.runs()
    assert len(runs) == 170 == len(set(runs))
    # 2 datasets x (clean + 3 triggers x 5 rates) with their seeds, each run once
    clean = [r for r in runs if r.attack == "clean"]
    assert {r.dataset for r in runs} == {"cifar10", "gtsrb"} and len(clean) == 2 * len(plan.seeds_for("clean"))
    assert all(r.dir == f"results/{r.dataset}/{r.model}/{r.attack}/seed{r.seed}" for r in runs)
    fp = plan.fine_prune_jobs()
    assert fp and all(run in {r.dir for r in runs} for run, _ in fp)  # Fine-Pruning starts from planned runs


def test_smoke_plan_names_every_table_and_its_page():
    plan = Plan(load("smoke"))
    targets = plan.all_targets()
    assert len(targets) == len(set(targets))
    for table in ("runs_synth.csv", "attacks_synth.md", "fine_pruning.tex", "routing_synth.csv", "precision_synth.md",
                  "detection_synth.md", "merging_synth.csv", "merged_defense_synth.md", "compression_synth.csv",
                  "blindspot_synth.csv", "blindspot_synth.html", "attacks_synth.html"):
        assert f"results/tables/{table}" in targets, table
    assert "results/config/config.html" in targets


def test_disabled_blocks_plan_no_jobs():
    cfg = load("smoke", **{"fine_pruning.enabled": False, "merging.enabled": False, "neural_cleanse.enabled": False,
                           "compression_attack.enabled": False, "blindspot.enabled": False, "analysis": None,
                           "deployment.precisions": []})
    plan = Plan(cfg)
    assert plan.fine_prune_jobs() == [] and plan.merging_strategies() == [] and plan.nc_runs("synth") == []
    assert plan.compression_runs("synth") == [] and plan.defense_applications("synth") == []
    assert plan.deploy_targets("synth") == [] and plan.analysis_targets() == []
    assert all(t.split("/")[2].startswith(("runs_", "attacks_", "asr_ba", "config")) for t in plan.all_targets())


def test_blindspot_defense_applications_cover_every_model_defense_and_precision():
    cfg = load("smoke", **{"blindspot.precisions": ["fp32", "int8"], "deployment.precisions": ["fp32", "int8", "int4"],
                           "neural_cleanse.precisions": ["int8", "int4"]})
    plan = Plan(cfg)
    apps = plan.defense_applications("synth")
    runs = plan.blindspot_runs("synth")
    assert {a for _, a in runs} == {"clean", "square-10"}  # blindspot.triggers [square] at rates [10]
    by_defense = {d: [a for a in apps if a.defense == d] for d in {a.defense for a in apps}}
    for defense in ("strip", "activation_clustering", "spectral_signatures"):
        assert len(by_defense[defense]) == len(runs) * 2
    # Neural Cleanse only where both its block and the blindspot block name the precision
    assert {a.precision for a in by_defense["neural_cleanse"]} == {"int8"}
    assert len({a.path for a in apps}) == len(apps)
    assert plan.blindspot_inputs("synth")["defenses"] == [a.path for a in apps]


def test_fine_tuning_jobs_do_not_depend_on_the_epochs_and_lr_they_override():
    before = Plan(load("smoke"))
    after = Plan(load("smoke", **{"train.epochs": 40, "train.lr": 0.2}))
    assert after.train != before.train
    assert after.defend_merged_params() == before.defend_merged_params()
    assert after.finetune_recipe(quiet=True) == before.finetune_recipe(quiet=True)
    assert after.finetune_recipe() == before.finetune_recipe()
    # what they do read still counts
    changed = Plan(load("smoke", **{"train.batch_size": 32}))
    assert changed.defend_merged_params() != before.defend_merged_params()
    assert changed.finetune_recipe() != before.finetune_recipe()


def test_a_defense_job_gets_its_block_without_the_keys_that_choose_jobs():
    plan = Plan(load("smoke", **{"neural_cleanse.schedule": "original"}))
    nc = plan.defense_config("neural_cleanse")
    assert nc["schedule"] == "original" and nc["images"] == 64 and nc["optimizer"] == {"epochs": 2, "batch_size": 32}
    assert not {"enabled", "precisions", "rates", "seeds"} & set(nc)
    assert plan.defense_config("strip")["overlays"] == 8  # the schema's defaults filled in beside the config's
    assert plan.defense_config("fine_tuning")["images"] == 500 and "enabled" not in plan.defense_config("fine_tuning")


def test_the_compression_attack_plans_on_a_control_model():
    plan = Plan(load("smoke", **{"models.control": {"arch": "vgg", "depth": 11, "width": 0.125},
                                 "compression_attack.model": "control"}))
    assert plan.compression_runs("synth") == [("control", "faithful-1", 0)]
    assert plan.routed_models() == ["pmoe"]  # routing analysis stays on the pMoE


def test_fine_pruning_fresh_models_per_rate():
    plan = Plan(load("smoke", **{"fine_pruning.model_per_rate": "fresh", "seeds.attack": 2}))
    jobs = plan.fine_prune_jobs()
    assert jobs == [("results/synth/pmoe/square-10/seed0", 10), ("results/synth/pmoe/square-10/seed1", 30)]


def test_pack_groups_consecutive_seeds_and_each_run_finds_its_pack():
    plan = Plan(load("smoke", **{"train.pack": 2, "seeds.clean": 5}))
    assert plan.seed_packs(5) == [[0, 1], [2, 3], [4]]
    for seed in range(5):
        wc = SimpleNamespace(dataset="synth", model="pmoe", attack="clean", seed=str(seed))
        first, last = plan.pack_of_run(wc).rsplit("seeds", 1)[1].split("-")
        assert int(first) <= seed <= int(last)
        members = plan.pack_runs(SimpleNamespace(dataset="synth", model="pmoe", attack="clean", first=first,
                                                 last=last))
        assert str(seed) in [m.seed for m in members]


def test_merging_victims_replicas_get_their_own_poison_seed():
    plan = Plan(load("smoke"))
    assert plan.set_victims("collusive") == [("square", "square", 0), ("square#2", "square", 1),
                                             ("blend", "blend", 0)]
    wc = SimpleNamespace(dataset="synth", model="pmoe", set="collusive", seed="0", victim="square", replica="1")
    assert plan.victim_poison(wc) == "results/synth/poison/square-10/seed100.safetensors"
    assert plan.set_triggers(wc) == {"square": "results/synth/triggers/square/seed0.safetensors",
                                     "square#2": "results/synth/triggers/square/seed100.safetensors",
                                     "blend": "results/synth/triggers/blend/seed0.safetensors"}


def test_relative_dataset_path_is_taken_from_the_layer_that_set_it(tmp_path: Path):
    cfg = load("cpu")
    layers = [(tmp_path / "a", {"datasets": {"cifar10": {"path": "x.npz"}}}),
              (tmp_path / "b", {"datasets": {"gtsrb": {"path": "y.npz"}}})]
    cfg["datasets"]["cifar10"]["path"] = "x.npz"
    cfg["datasets"]["gtsrb"]["path"] = "y.npz"
    plan = Plan(cfg, layers, cwd=str(tmp_path / "cwd"))
    assert plan.dataset_path("cifar10") == str(tmp_path / "a" / "x.npz")
    assert plan.dataset_path("gtsrb") == str(tmp_path / "b" / "y.npz")
    assert plan.dataset_spec("cifar10")["digest"] is None  # no file there (yet): Snakemake reports the input


@pytest.mark.parametrize("change, expected", [
    ({"analysis.rate": 3}, "analysis.rate has 3, which is not one of attack.rates"),
    ({"analysis.seed": 5}, "analysis.seed 5 has no run"),
    ({"fine_pruning.triggers": ["nope"]}, "fine_pruning.triggers names 'nope', which is not in the main study's"),
    ({"study_triggers": ["nope"]}, "study_triggers names 'nope', which is not in attack.triggers"),
    ({"fine_pruning.datasets": ["nope"]}, "fine_pruning.datasets names 'nope', which is not in 'datasets'"),
    ({"merging.model": "nope"}, "merging.model 'nope' must name a model of 'models' with module slots"),
    ({"fine_pruning.models": ["dense"], "models.dense": {"arch": "wrn"}},
     "'dense' must name a model of 'models' with expert"),
    ({"merging.seeds": 9}, "merging.seeds (9) exceeds seeds.clean (2)"),
    ({"compression_attack.variants": ["prune"], "models.control": {"arch": "vgg"},
      "compression_attack.model": "control"},
     "compression_attack.model (a pruning variant) 'control' must name a model of 'models' with expert channels"),
    ({"compression_attack.model": "nope"}, "compression_attack.model names 'nope', which is not in 'models'"),
    ({"compression_attack.prune": {"rate": 40, "lower": 10, "upper": 30}}, "needs lower <= rate <= upper"),
    ({"blindspot.precisions": ["int8_dynamic"]}, "blindspot.precisions ['int8_dynamic'] are not in deployment"),
    ({"strip.holdout": 10}, "strip.holdout (10) is too small for strip.frr 0.05"),
    ({"neural_cleanse.rates": [5]}, "neural_cleanse.rates has 5"),
    ({"attack.triggers": {"clean": {"kind": "square"}}}, "triggers name 'clean' must be letters"),
])
def test_cross_field_checks_name_the_key(change, expected):
    with pytest.raises(ConfigError) as info:
        load("smoke", **change)
    assert expected in str(info.value) and "\n" not in str(info.value)


def test_study_triggers_keep_a_merging_only_trigger_out_of_the_main_study():
    cfg = load("smoke", study_triggers=["square"], **{"fine_pruning.triggers": ["square"],
                                                       "blindspot.triggers": ["square"]})
    plan = Plan(cfg)
    assert {r.attack for r in plan.runs()} == {"clean", "square-2", "square-10"}
    assert plan.all_triggers == ["square", "blend", "warped"]
    wc = SimpleNamespace(dataset="synth", model="pmoe", set="square_blend", seed="0", victim="blend", replica="0")
    assert plan.victim_poison(wc) == "results/synth/poison/blend-10/seed0.safetensors"
    assert "blend" in plan.set_triggers(wc)
    with pytest.raises(ConfigError, match="blindspot.triggers names 'blend', which is not in the main study's"):
        load("smoke", study_triggers=["square"], **{"fine_pruning.triggers": ["square"]},
             **{"blindspot.triggers": ["blend"]})


def test_router_evasion_trains_only_its_own_runs_with_the_term():
    triggers = {"square": {"kind": "square", "size": 4, "value": 1},
                "square_evasive": {"kind": "square", "size": 4, "value": 255, "router_evasion": {"weight": 1.0}}}
    cfg = load("smoke", **{"attack.triggers": triggers, "merging.enabled": False, "fine_pruning.triggers": ["square"],
                           "blindspot.triggers": ["square", "square_evasive"]})
    plan = Plan(cfg)
    run = SimpleNamespace(dataset="synth", model="pmoe", attack="square_evasive-10", seed="0")
    assert plan.run_train(run)["router_evasion"] == {"weight": 1.0, "margin": 0.5, "rank_images": 1000}
    for attack in ("square-10", "clean"):  # untouched: the other runs keep their settings (and results)
        assert plan.run_train(SimpleNamespace(**{**vars(run), "attack": attack})) == plan.train
    assert "router_evasion" not in plan.trigger_params("square_evasive")[1]  # the pattern alone
    with pytest.raises(ConfigError, match="router_evasion needs train.pack 1"):
        load("smoke", **{"attack.triggers": triggers, "merging.enabled": False, "fine_pruning.triggers": ["square"],
                         "train.pack": 2})
    with pytest.raises(ConfigError, match="merging.sets.square_blend names 'square'"):
        load("smoke", **{"attack.triggers": {**triggers, "blend": {"kind": "blend", "alpha": 0.5},
                                             "square": triggers["square_evasive"]}})
