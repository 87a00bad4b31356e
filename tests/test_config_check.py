"""Tests of pmoe_backdoor.config_check: one-line schema errors, defaults, and the Fine-Pruning seed layout."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

pytest.importorskip("snakemake", reason="the workflow extra is not installed (pip install -e '.[workflow]')")

from pmoe_backdoor.config_check import ConfigError, dotted, validate_config  # noqa: E402
from pmoe_backdoor.study_checks import check_fine_pruning_seeds, fine_prune_seed  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SCHEMA = REPO / "config" / "schema.yaml"
SMOKE = yaml.safe_load((REPO / "config" / "smoke.yaml").read_text())


def smoke(**changes) -> dict:
    """The smoke config with dotted keys set (value None: removed)."""
    cfg = copy.deepcopy(SMOKE)
    for key, value in changes.items():
        *parents, last = key.split(".")
        node = cfg
        for part in parents:
            node = node[part]
        if value is None:
            node.pop(last, None)
        else:
            node[last] = value
    return cfg


def message(cfg: dict) -> str:
    with pytest.raises(ConfigError) as info:
        validate_config(cfg, SCHEMA)
    text = str(info.value)
    assert "\n" not in text and len(text) < 300, text
    return text


def test_the_shipped_configs_pass_and_get_the_schema_defaults():
    for name in ("config", "cpu", "smoke"):
        validate_config(yaml.safe_load((REPO / "config" / f"{name}.yaml").read_text()), SCHEMA)
    cfg = smoke(**{"fine_pruning.model_per_rate": None, "resources.jobs_per_gpu": None})
    del cfg["deployment"]
    validate_config(cfg, SCHEMA)
    assert cfg["fine_pruning"]["model_per_rate"] == "shared"
    assert cfg["resources"]["jobs_per_gpu"] == 1
    assert cfg["deployment"] == {"precisions": [], "calibration_images": 512}
    cfg = smoke()
    del cfg["fine_pruning"]
    validate_config(cfg, SCHEMA)
    assert cfg["fine_pruning"] == {"enabled": False, "model_per_rate": "shared"}


def test_a_typo_names_the_key_and_the_nearest_valid_one():
    cfg = smoke(**{"train.epochs": None})
    cfg["train"]["epoch"] = 3
    assert message(cfg) == "config: unknown key 'train.epoch' (did you mean 'train.epochs'?)"
    cfg = smoke()
    cfg["trian"] = cfg.pop("train")
    assert message(cfg) == "config: unknown key 'trian' (did you mean 'train'?)"  # not "train is missing"
    cfg = smoke()
    cfg["fine_pruning"]["prune_rate"] = cfg["fine_pruning"].pop("prune_rates")
    assert message(cfg) == "config: unknown key 'fine_pruning.prune_rate' (did you mean 'fine_pruning.prune_rates'?)"


def test_a_typo_inside_an_if_then_trigger_schema():
    cfg = smoke(**{"attack.triggers.square": {"kind": "square", "sise": 4}})
    assert message(cfg) == ("config: unknown key 'attack.triggers.square.sise' "
                            "(did you mean 'attack.triggers.square.size'?)")
    cfg = smoke(**{"attack.triggers.blend.patern": "noise"})
    assert message(cfg) == ("config: unknown key 'attack.triggers.blend.patern' "
                            "(did you mean 'attack.triggers.blend.pattern'?)")
    cfg = smoke(**{"attack.triggers.warped.zzz": 1})  # nothing near: the valid keys instead
    assert message(cfg) == ("config: unknown key 'attack.triggers.warped.zzz' "
                            "(valid keys here: kind, k, s, grid_rescale, sampler)")


def test_wrong_types_values_and_missing_keys():
    assert message(smoke(**{"train.epochs": "3"})) == "config: train.epochs: expected an integer, got '3' (a string)"
    assert message(smoke(**{"train.precision": "fp16"})) == (
        "config: train.precision: expected one of 'fp32', 'bf16', got 'fp16' (did you mean 'bf16'?)")
    assert message(smoke(**{"datasets.synth.source": "synthetc"})).endswith(
        "got 'synthetc' (did you mean 'synthetic'?)")
    assert message(smoke(**{"attack.rates": [2, 200]})) == "config: attack.rates[1]: expected a number <= 100, got 200"
    assert message(smoke(**{"evaluation.batch_size": 0})) == (
        "config: evaluation.batch_size: expected an integer >= 1, got 0")
    assert message(smoke(**{"fine_pruning.finetune_data": []})) == (
        "config: fine_pruning.finetune_data: expected a list of at least 1 item, got []")
    assert message(smoke(**{"seeds": 3})) == "config: seeds: expected a mapping (key: value), got 3 (an integer)"
    assert message(smoke(**{"attack.target": None})) == "config: missing required key 'attack.target'"
    assert message(smoke(**{"fine_pruning.model_per_rate": "new"})) == (
        "config: fine_pruning.model_per_rate: expected one of 'shared', 'fresh', got 'new'")


def test_dotted_paths():
    assert dotted(["attack", "rates", 2]) == "attack.rates[2]"
    assert dotted([]) == ""


def test_fine_prune_seed_layout():
    assert [fine_prune_seed(r, j, 3, "shared") for r in range(2) for j in range(3)] == [0, 0, 0, 1, 1, 1]
    assert [fine_prune_seed(r, j, 3, "fresh") for r in range(2) for j in range(3)] == [0, 1, 2, 3, 4, 5]


def test_fresh_models_need_enough_attack_seeds():
    fp = {"runs": 3, "prune_rates": [10, 20, 30], "model_per_rate": "fresh"}
    check_fine_pruning_seeds(fp, 9)
    with pytest.raises(ValueError, match=r"runs \(3\) x prune_rates \(3\) = 9 attack seeds, but seeds.attack is 5"):
        check_fine_pruning_seeds(fp, 5)
    check_fine_pruning_seeds(dict(fp, model_per_rate="shared"), 3)
    with pytest.raises(ValueError, match=r"fine_pruning.runs \(3\) exceeds seeds.attack \(2\)"):
        check_fine_pruning_seeds(dict(fp, model_per_rate="shared"), 2)
