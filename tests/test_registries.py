"""The registries of triggers, models and defenses: what the schema accepts is what is registered, the DAG-time
registries import no torch, and the workflow decides on their properties rather than on names."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from pmoe_backdoor.attacks import TRAINING_TERMS, TRIGGERS, make_trigger
from pmoe_backdoor.defenses import DEFENSES, LEVELS, DefenseSummary, _declared
from pmoe_backdoor.models import MODELS

REPO = Path(__file__).resolve().parents[1]
SCHEMA = yaml.safe_load((REPO / "config" / "schema.yaml").read_text())


def test_schema_names_exactly_the_registered_trigger_kinds_and_models():
    trigger = SCHEMA["definitions"]["trigger"]
    assert set(trigger["properties"]["kind"]["enum"]) == set(TRIGGERS)
    # each kind's own parameters in the schema are the keys its implementation accepts
    for rule in trigger["allOf"]:
        kind = rule["if"]["properties"]["kind"]["const"]
        training = set(TRAINING_TERMS) if TRIGGERS[kind].patch_located else set()
        assert set(rule["then"]["properties"]) - {"kind"} == TRIGGERS[kind].load().CONFIG_KEYS | training, kind
    assert set(SCHEMA["definitions"]["model"]["properties"]["arch"]["enum"]) == set(MODELS)


def test_every_registered_defense_has_a_config_block_with_defaults():
    assert {"strip", "activation_clustering", "spectral_signatures", "neural_cleanse", "fine_tuning"} <= set(DEFENSES)
    for name, spec in DEFENSES.items():
        block = SCHEMA["properties"].get(name)
        assert block is not None, f"config/schema.yaml has no block for the defense {name!r}"
        assert "default" in block, name  # a config without the block still runs the defense's jobs
        assert spec.level in LEVELS and callable(spec.load().run), name


def test_registries_import_no_torch():
    code = ("import sys; import pmoe_backdoor.attacks, pmoe_backdoor.models, pmoe_backdoor.defenses, "
            "pmoe_backdoor.plan; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_trigger_properties_decide_seeds_contamination_and_routing():
    from pmoe_backdoor.jobs.poison import trigger_seed
    from pmoe_backdoor.models.routing import trigger_positions

    assert [k for k, t in TRIGGERS.items() if t.fresh_per_run] == ["warp"]
    # a kind drawn per run gets another seed per run; the others one seed for all runs
    assert trigger_seed("warp", 0, 1) != trigger_seed("warp", 0, 2)
    assert trigger_seed("blend", 0, 1) == trigger_seed("blend", 0, 2)
    assert make_trigger("square").spec.patch_located and trigger_positions(make_trigger("square")) == [0]
    with pytest.raises(TypeError, match="patch-located"):
        trigger_positions(make_trigger("blend"))
    with pytest.raises(ValueError, match="trigger kind must be one of"):
        make_trigger("stripes")
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) \['sise'\]"):
        make_trigger("square", {"sise": 3})


def test_model_capabilities_not_names_decide_the_stages(tmp_path: Path):
    from pmoe_backdoor.config_check import ConfigError
    from pmoe_backdoor.study_checks import check_capable_model

    assert MODELS["pmoe"].routing and not MODELS["wrn"].prunable_channels
    cfg = {"models": {"dense": {"arch": "wrn"}, "moe": {"arch": "pmoe"}}}
    check_capable_model(cfg, "moe", "merging.model", "module_slots", "module slots")
    with pytest.raises(ConfigError, match="'dense' must name a model of 'models' with module slots"):
        check_capable_model(cfg, "dense", "merging.model", "module_slots", "module slots")


def test_a_defense_is_declared_by_a_literal_block_and_read_typed(tmp_path: Path):
    module = tmp_path / "my_defense.py"
    module.write_text('import torch\n\nDEFENSE = {"name": "my_defense", "title": "Mine", "level": "input"}\n')
    assert _declared(module) == {"name": "my_defense", "title": "Mine", "level": "input"}  # torch never imported
    (tmp_path / "plain.py").write_text("x = 1\n")
    assert _declared(tmp_path / "plain.py") is None
    fields = {"defense_name": "strip", "dataset": "d", "model": "m", "attack": "square-2", "seed": 1,
              "precision": "int8", "flagged": True, "target_found": None}
    summary = DefenseSummary.from_dict(fields)
    assert (summary.title, summary.flagged, summary.target_found, summary.asr_after) == ("STRIP", True, None, None)
    with pytest.raises(ValueError, match="x.json: not a defense summary"):
        DefenseSummary.from_dict({k: v for k, v in fields.items() if k != "flagged"}, "x.json")


def test_the_plan_runs_removal_defenses_on_attacked_models_only():
    from pmoe_backdoor.config_check import validate_config
    from pmoe_backdoor.plan import Plan
    from pmoe_backdoor.study_checks import check_study

    pytest.importorskip("snakemake")
    cfg = yaml.safe_load((REPO / "config" / "smoke.yaml").read_text())
    validate_config(cfg, REPO / "config" / "schema.yaml")
    check_study(cfg)
    apps = Plan(cfg).defense_applications("synth")
    assert {a.attack for a in apps if a.defense == "fine_tuning"} == {"square-10"}
    assert {a.attack for a in apps if a.defense == "strip"} == {"clean", "square-10"}
    cfg["fine_tuning"]["enabled"] = False
    assert "fine_tuning" not in {a.defense for a in Plan(cfg).defense_applications("synth")}
    wc = SimpleNamespace(dataset="synth", attack="clean", seed="0")
    assert Plan(cfg).defense_triggers(wc) == {"square": "results/synth/triggers/square/seed0.safetensors"}
