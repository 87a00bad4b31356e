"""The config's checks: the schema with one readable line per problem, then the cross-field checks the schema
cannot express (:func:`check_study`), all before any job starts.

Snakemake's ``validate`` reports a schema violation as the whole failing sub-schema and instance (hundreds of
lines for a one-letter typo). :func:`validate_config` runs it unchanged (it also fills in the schema's defaults)
and, when it fails, raises instead one line naming the key by its dotted path, e.g.
``config: unknown key 'train.epoch' (did you mean 'train.epochs'?)``.
"""

from __future__ import annotations

import difflib
import json
import os
import re
from typing import Any, Iterable

TYPE_NAMES = {"integer": "an integer", "number": "a number", "string": "a string", "boolean": "true or false",
              "object": "a mapping (key: value)", "array": "a list", "null": "null"}
BOUNDS = {"minimum": ">=", "maximum": "<=", "exclusiveMinimum": ">", "exclusiveMaximum": "<"}


class ConfigError(ValueError):
    """A config that does not fit the schema; the message is one line."""


def dotted(path: Iterable[Any]) -> str:
    """``['attack', 'rates', 2]`` as ``attack.rates[2]``."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _join(*parts: Any) -> str:
    return dotted(p for p in parts if p != "")


def _show(value: Any, limit: int = 60) -> str:
    """A value as the user wrote it in YAML, shortened."""
    if isinstance(value, str):
        text = repr(value)
    elif isinstance(value, bool) or value is None:
        text = json.dumps(value)
    else:
        text = json.dumps(value, default=str) if isinstance(value, (dict, list)) else str(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _kind(value: Any) -> str:
    """What a value is, in the schema's words."""
    for typ, name in ((bool, "a boolean"), (int, "an integer"), (float, "a number"), (str, "a string"),
                      (dict, "a mapping"), (list, "a list")):
        if isinstance(value, typ):
            return name
    return "null" if value is None else type(value).__name__


def _suggest(word: str, choices: Iterable[str]) -> str | None:
    hits = difflib.get_close_matches(word, [str(c) for c in choices], n=1, cutoff=0.6)
    return hits[0] if hits else None


def _unknown_keys(error: Any) -> str:
    schema, where = error.schema, list(error.absolute_path)
    allowed = list(schema.get("properties", {}))
    extras = [k for k in error.instance if k not in allowed]
    parts = []
    for key in extras:
        hint = _suggest(str(key), allowed)
        tail = f"did you mean {_join(*where, hint)!r}?" if hint else f"valid keys here: {', '.join(allowed)}"
        parts.append(f"unknown key {_join(*where, key)!r} ({tail})")
    return "; ".join(parts) or error.message


def _expected(error: Any) -> str:
    """What the schema wanted, as a phrase: 'an integer', 'one of 'fp32', 'bf16'', 'a number >= 1'."""
    validator, value, schema = error.validator, error.validator_value, error.schema
    if validator == "type":
        types = value if isinstance(value, list) else [value]
        return " or ".join(TYPE_NAMES.get(t, t) for t in types)
    if validator == "enum":
        return "one of " + ", ".join(_show(v) for v in value)
    if validator == "const":
        return _show(value)
    if validator in BOUNDS:
        noun = "an integer" if schema.get("type") == "integer" else "a number"
        return f"{noun} {BOUNDS[validator]} {value:g}"
    if validator == "minItems":
        return f"a list of at least {value} item{'s' * (value != 1)}"
    if validator == "maxItems":
        return f"a list of at most {value} item{'s' * (value != 1)}"
    if validator == "uniqueItems":
        return "a list without repeated items"
    if validator == "minProperties":
        return f"at least {value} entr{'ies' if value != 1 else 'y'}"
    return ""


def describe(error: Any) -> str:
    """One line for a ``jsonschema.ValidationError``."""
    path = list(error.absolute_path)
    where = dotted(path) or "the top level"
    if error.validator == "additionalProperties" and isinstance(error.instance, dict):
        return f"config: {_unknown_keys(error)}"
    if error.validator == "required":
        missing = [k for k in error.validator_value if k not in error.instance]
        key = missing[0] if missing else error.message
        return f"config: missing required key {_join(*path, key)!r}"
    expected = _expected(error)
    if not expected:
        message = " ".join(error.message.split())
        return f"config: {where}: {message[:200]}"
    got = _show(error.instance)
    if error.validator == "type":
        got += f" ({_kind(error.instance)})"
    line = f"config: {where}: expected {expected}, got {got}"
    if error.validator == "enum" and isinstance(error.instance, str):
        hint = _suggest(error.instance, error.validator_value)
        line += f" (did you mean {hint!r}?)" if hint else ""
    return line


def first_problem(config: dict, schema: dict) -> Any | None:
    """The error to report: an unknown key before anything else (a typo also makes the key it meant look
    missing), else the first error in the document's order."""
    from jsonschema import Draft202012Validator

    errors = list(Draft202012Validator(schema).iter_errors(config))
    unknown = [e for e in errors if e.validator == "additionalProperties"]
    return (unknown or errors or [None])[0]


def validate_config(config: dict, schema_path: str | os.PathLike) -> None:
    """Snakemake's ``validate`` (defaults filled in from the schema), failing with a one-line ConfigError."""
    import yaml
    from snakemake.exceptions import WorkflowError
    from snakemake.utils import validate

    try:
        validate(config, os.fspath(schema_path))
    except WorkflowError as exc:
        with open(schema_path) as fh:
            schema = yaml.safe_load(fh)
        error = first_problem(config, schema) or exc.__context__
        if error is None or not hasattr(error, "validator"):
            raise
        raise ConfigError(describe(error)) from None


def fine_prune_seed(run: int, rate_index: int, n_rates: int, model_per_rate: str) -> int:
    """The attack seed of the model that Fine-Pruning run ``run`` prunes at its ``rate_index``-th prune rate:
    run ``run``'s model at every rate (``shared``), or a model of its own per rate (``fresh``: seed
    ``run * n_rates + rate_index``)."""
    return run * n_rates + rate_index if model_per_rate == "fresh" else run


def check_fine_pruning_seeds(fp: dict, attack_seeds: int) -> None:
    """Every model Fine-Pruning starts from must be one of the attack runs (seeds 0 .. seeds.attack - 1)."""
    runs, n_rates = fp["runs"], len(fp["prune_rates"])
    if fp["model_per_rate"] == "fresh" and runs * n_rates > attack_seeds:
        raise ConfigError(f"config: fine_pruning.model_per_rate 'fresh' prunes a model of its own per run and prune "
                          f"rate: runs ({runs}) x prune_rates ({n_rates}) = {runs * n_rates} attack seeds, but "
                          f"seeds.attack is {attack_seeds} (raise it to {runs * n_rates}, or use model_per_rate "
                          "'shared')")
    if fp["model_per_rate"] != "fresh" and runs > attack_seeds:
        raise ConfigError(f"config: fine_pruning.runs ({runs}) exceeds seeds.attack ({attack_seeds})")


NAME = re.compile(r"[A-Za-z0-9_]+")


def check_rates(cfg: dict, rates: Iterable[Any], where: str) -> None:
    attack_rates = [float(r) for r in cfg["attack"]["rates"]]
    for rate in rates:
        if float(rate) not in attack_rates:
            raise ConfigError(f"config: {where} has {rate}, which is not one of attack.rates {attack_rates}")


def check_names(names: Iterable[str], where: str, pool: Iterable[str], pool_name: str) -> None:
    pool = list(pool)
    for name in names:
        if name not in pool:
            raise ConfigError(f"config: {where} names {name!r}, which is not in {pool_name}")


def check_capable_model(cfg: dict, model: str, where: str, capability: str, what: str) -> None:
    """A stage that needs a capability of the model (``pmoe_backdoor.models.ModelKind``: routers, module slots,
    prunable channels) checks the model's registered kind, not its name."""
    from .models import MODELS

    arch = cfg["models"].get(model, {}).get("arch")
    if arch not in MODELS or not getattr(MODELS[arch], capability):
        able = [name for name, kind in MODELS.items() if getattr(kind, capability)]
        raise ConfigError(f"config: {where} {model!r} must name a model of 'models' with {what} (arch {able})")


def check_study(cfg: dict) -> None:
    """Cross-field checks of a schema-valid config (defaults filled in); each failure is one ConfigError line."""
    for group, entries in (("datasets", cfg["datasets"]), ("models", cfg["models"]),
                           ("triggers", cfg["attack"]["triggers"])):
        for name in entries:
            if not NAME.fullmatch(name) or name == "clean":
                raise ConfigError(f"config: {group} name {name!r} must be letters, digits or '_' and not 'clean'")
    check_names(cfg.get("study_models", []), "study_models", cfg["models"], "'models'")
    _check_analysis(cfg)
    if cfg["neural_cleanse"]["enabled"]:
        check_rates(cfg, cfg["neural_cleanse"]["rates"], "neural_cleanse.rates")
    _check_fine_pruning(cfg)
    _check_merging(cfg)
    _check_compression_attack(cfg)
    _check_blindspot(cfg)


def _check_analysis(cfg: dict) -> None:
    analysis = cfg.get("analysis")
    if analysis is None:
        return
    check_rates(cfg, [analysis["rate"]], "analysis.rate")
    if analysis["seed"] >= min(cfg["seeds"]["clean"], cfg["seeds"]["attack"]):
        raise ConfigError(f"config: analysis.seed {analysis['seed']} has no run (seeds start at 0)")
    check_names(analysis.get("classes_by_dataset", {}), "analysis.classes_by_dataset", cfg["datasets"], "'datasets'")


def _check_fine_pruning(cfg: dict) -> None:
    fp = cfg["fine_pruning"]
    if not fp["enabled"]:
        return
    check_names(fp["datasets"], "fine_pruning.datasets", cfg["datasets"], "'datasets'")
    check_names(fp["models"], "fine_pruning.models", cfg.get("study_models") or cfg["models"],
                "the main study's models ('study_models' or 'models')")
    check_names(fp["triggers"], "fine_pruning.triggers", cfg["attack"]["triggers"], "attack.triggers")
    check_rates(cfg, fp["poison_rates"], "fine_pruning.poison_rates")
    for model in fp["models"]:
        check_capable_model(cfg, model, "fine_pruning.models names", "prunable_channels",
                            "expert channels to prune (Fine-Pruning)")
    check_fine_pruning_seeds(fp, cfg["seeds"]["attack"])


def _check_merging(cfg: dict) -> None:
    merge = cfg["merging"]
    if not merge["enabled"]:
        return
    check_capable_model(cfg, merge["model"], "merging.model", "module_slots", "module slots to switch")
    check_names([merge["model"]], "merging.model", cfg.get("study_models") or cfg["models"],
                "the main study's models ('study_models' or 'models'): the victims start from its clean runs")
    _check_merging_couplings(cfg)
    check_names(merge["datasets"], "merging.datasets", cfg["datasets"], "'datasets'")
    if merge["seeds"] > cfg["seeds"]["clean"]:
        raise ConfigError(f"config: merging.seeds ({merge['seeds']}) exceeds seeds.clean ({cfg['seeds']['clean']}): "
                          "each ancestor is the clean run of its seed")
    for name, members in merge["sets"].items():
        if not NAME.fullmatch(name):
            raise ConfigError(f"config: merging.sets name {name!r} must be letters, digits or '_'")
        check_names([m for m in members if m != "benign"], f"merging.sets.{name}", cfg["attack"]["triggers"],
                    "attack.triggers (nor is it 'benign')")
    check_names(merge.get("defended_sets", []), "merging.defended_sets", merge["sets"], "merging.sets")


def _check_merging_couplings(cfg: dict) -> None:
    """``tied`` moves routers with their experts: without routers only ``free`` exists (the plan drops ``tied``)."""
    from .models import MODELS

    merge = cfg["merging"]
    arch = cfg["models"][merge["model"]]["arch"]
    if not MODELS[arch].routing and "free" not in merge["couplings"]:
        raise ConfigError(f"config: merging.couplings {list(merge['couplings'])} ties routers to their experts, but "
                          f"merging.model {merge['model']!r} (arch {arch}) has no routers: use [free]")


def _check_compression_attack(cfg: dict) -> None:
    block = cfg["compression_attack"]
    if not block["enabled"]:
        return
    models = [block["model"]] if isinstance(block["model"], str) else block["model"]
    check_names(models, "compression_attack.model", cfg["models"], "'models'")
    for model in models if set(block["variants"]) & {"prune", "prune_unknown"} else []:  # they prune experts
        check_capable_model(cfg, model, "compression_attack.model (a pruning variant)", "prunable_channels",
                            "expert channels to prune")
    for key in ("datasets", "targets_by_dataset", "lr_drop_epoch_by_dataset", "max_fp32_asr_by_dataset"):
        check_names(block.get(key, []), f"compression_attack.{key}", cfg["datasets"], "'datasets'")
    prune = block["prune"]
    if not prune["lower"] <= prune["rate"] <= prune["upper"]:
        raise ConfigError(f"config: compression_attack.prune needs lower <= rate <= upper, got {prune}")


def _check_blindspot(cfg: dict) -> None:
    block = cfg["blindspot"]
    if not block["enabled"]:
        return
    check_rates(cfg, block["rates"], "blindspot.rates")
    check_names(block.get("triggers", []), "blindspot.triggers", cfg["attack"]["triggers"], "attack.triggers")
    if missing := [p for p in block["precisions"] if p not in cfg["deployment"]["precisions"]]:
        raise ConfigError(f"config: blindspot.precisions {missing} are not in deployment.precisions (the table "
                          "takes ASR and BA at each precision from the deployed models)")
    for name in ("strip", "router_ablation", "saliency_ablation"):  # thresholds set on held-out clean inputs
        d = cfg.get(name) or {}
        if d.get("enabled", True) and "frr" in d and d["holdout"] < 1 / d["frr"]:
            raise ConfigError(f"config: {name}.holdout ({d['holdout']}) is too small for {name}.frr {d['frr']}: at "
                              f"least 1 / frr = {1 / d['frr']:g} held-out images are needed to set the threshold")
