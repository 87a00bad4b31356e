"""The config's cross-field checks, those the schema cannot express (:func:`check_study`, after
:func:`pmoe_backdoor.config_check.validate_config` filled in the defaults), each failure one
:class:`~pmoe_backdoor.config_check.ConfigError` line naming the key, before any job starts."""

from __future__ import annotations

import re
from typing import Any, Collection, Iterable

from .config_check import ConfigError


def fine_prune_seed(run: int, rate_index: int, n_rates: int, model_per_rate: str) -> int:
    """The attack seed Fine-Pruning run ``run`` prunes at its ``rate_index``-th prune rate: run ``run``'s model at
    every rate (``shared``), or a model of its own per rate (``fresh``: seed ``run * n_rates + rate_index``)."""
    return run * n_rates + rate_index if model_per_rate == "fresh" else run


def check_fine_pruning_seeds(fp: dict, attack_seeds: int) -> None:
    """Every model Fine-Pruning starts from must be one of the attack runs (seeds 0 .. seeds.attack - 1)."""
    runs, n_rates = fp["runs"], len(fp["prune_rates"])
    if fp["model_per_rate"] == "fresh" and runs * n_rates > attack_seeds:
        raise ConfigError(f"config: fine_pruning.model_per_rate 'fresh' prunes a model of its own per run and prune "
                          f"rate: runs ({runs}) x prune_rates ({n_rates}) = {runs * n_rates} attack seeds, but seeds."
                          f"attack is {attack_seeds} (raise it to {runs * n_rates}, or use model_per_rate 'shared')")
    if fp["model_per_rate"] != "fresh" and runs > attack_seeds:
        raise ConfigError(f"config: fine_pruning.runs ({runs}) exceeds seeds.attack ({attack_seeds})")


NAME = re.compile(r"[A-Za-z0-9_]+")


def check_rates(cfg: dict, rates: Iterable[Any], where: str) -> None:
    attack_rates = [float(r) for r in cfg["attack"]["rates"]]
    for rate in rates:
        if float(rate) not in attack_rates:
            raise ConfigError(f"config: {where} has {rate}, which is not one of attack.rates {attack_rates}")


def check_names(names: Iterable[str], where: str, pool: Collection[str], pool_name: str) -> None:
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
    check_names(cfg.get("study_triggers", []), "study_triggers", cfg["attack"]["triggers"], "attack.triggers")
    _check_analysis(cfg)
    if cfg["neural_cleanse"]["enabled"]:
        check_rates(cfg, cfg["neural_cleanse"]["rates"], "neural_cleanse.rates")
    _check_fine_pruning(cfg)
    _check_merging(cfg)
    _check_compression_attack(cfg)
    _check_blindspot(cfg)
    _check_router_evasion(cfg)


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
    check_names(fp["triggers"], "fine_pruning.triggers", cfg.get("study_triggers") or cfg["attack"]["triggers"],
                "the main study's triggers")
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
    check_names(block.get("triggers", []), "blindspot.triggers",
                cfg.get("study_triggers") or cfg["attack"]["triggers"], "the main study's triggers")
    if missing := [p for p in block["precisions"] if p not in cfg["deployment"]["precisions"]]:
        raise ConfigError(f"config: blindspot.precisions {missing} are not in deployment.precisions (the table "
                          "takes ASR and BA at each precision from the deployed models)")
    for name in ("strip", "router_ablation", "saliency_ablation"):  # thresholds set on held-out clean inputs
        d = cfg.get(name) or {}
        if d.get("enabled", True) and "frr" in d and d["holdout"] < 1 / d["frr"]:
            raise ConfigError(f"config: {name}.holdout ({d['holdout']}) is too small for {name}.frr {d['frr']}: at "
                              f"least 1 / frr = {1 / d['frr']:g} held-out images are needed to set the threshold")


def _check_router_evasion(cfg: dict) -> None:
    """An adaptive attack (a trigger with ``router_evasion``) trains the routers of every main-study model alone
    (not in a pack) from the main study's runs; merging victims are fine-tuned without the term."""
    evasive = [name for name, t in cfg["attack"]["triggers"].items() if t.get("router_evasion") is not None]
    if not evasive:
        return
    models = cfg.get("study_models") or list(cfg["models"])
    for model in models:
        check_capable_model(cfg, model, f"attack.triggers.{evasive[0]}.router_evasion trains every main-study model:",
                            "routing", "routers (the term keeps the trigger out of their top-k)")
    if cfg["train"].get("pack", 1) > 1:
        raise ConfigError(f"config: attack.triggers.{evasive[0]}.router_evasion needs train.pack 1 (the evasive "
                          f"step trains one model at a time), got {cfg['train']['pack']}")
    for name, members in (cfg["merging"].get("sets") or {}).items() if cfg["merging"]["enabled"] else []:
        if bad := [m for m in members if m in evasive]:
            raise ConfigError(f"config: merging.sets.{name} names {bad[0]!r}, whose router_evasion the victims' "
                              "fine-tuning does not apply")
