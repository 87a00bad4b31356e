"""The plan of the studies beside the main one: routing analysis, merging (Li et al.) and the quantization-blindspot
table (Pandey & Ye); the compression-activated backdoors (Tian et al.) are in :mod:`.compression`. Mixed into
:class:`Plan`; they read the main study's attributes (``self.config``, ``self.triggers``, ...)."""

from __future__ import annotations

from typing import Any, Iterable, Mapping

from ..defenses import DEFENSES
from ..models import MODELS
from ..naming import CLEAN, attack_name, fmt_rate, parse_attack
from .common import DEFENSE_SELECTION_KEYS, REPLICA_SEED_STEP, RESULTS, DefenseApplication, canonical, without


class AnalysisPlan:

    def analysis_classes(self, dataset: str) -> list[int]:
        return self.analysis.get("classes_by_dataset", {}).get(dataset, self.analysis["classes"])

    def analysis_trigger_files(self, dataset: str) -> list[str]:
        return [self.trigger_path(dataset, t, self.analysis["seed"]) for t in self.triggers]

    def analysis_models(self, wc: Any) -> dict[str, dict[str, str | None]]:
        """The clean model and each trigger's model at the analysis rate, all at the analysis seed."""
        seed, rate = self.analysis["seed"], fmt_rate(self.analysis["rate"])
        base = f"{RESULTS}/{wc.dataset}/{wc.model}"
        models: dict[str, dict[str, str | None]] = {
            CLEAN: {"weights": f"{base}/clean/seed{seed}/weights.safetensors", "trigger": None}
        }
        for trig in self.triggers:
            models[f"{trig} {rate} %"] = {
                "weights": f"{base}/{attack_name(trig, rate)}/seed{seed}/weights.safetensors",
                "trigger": self.trigger_path(wc.dataset, trig, seed),
            }
        return models

    def fineprune_models(self, wc: Any) -> dict[str, dict[str, str]]:
        """The backdoored model before Fine-Pruning and after it, at each pruning rate (first fine-tuning set), for
        Fine-Pruning run analysis.seed; with model_per_rate 'fresh', each rate's own model before it."""
        fp = self.fp
        run, trig, rate = self.analysis["seed"], fp["triggers"][0], fmt_rate(fp["poison_rates"][0])
        base = f"{RESULTS}/{wc.dataset}/{wc.model}/{attack_name(trig, rate)}"
        fresh = fp["model_per_rate"] == "fresh"
        models = {}
        for j, p in enumerate(fp["prune_rates"]):
            seed = self.fp_seed(run, j)
            trigger = self.trigger_path(wc.dataset, trig, seed)
            if j == 0 or fresh:
                label = f"{trig} {rate} % before" + (f" (seed {seed})" if fresh else "")
                models[label] = {"weights": f"{base}/seed{seed}/weights.safetensors", "trigger": trigger}
            models[f"after FP {fmt_rate(p)} %"] = {
                "weights": f"{base}/seed{seed}/fineprune/{fp['finetune_data'][0]}/{fmt_rate(p)}/weights.safetensors",
                "trigger": trigger,
            }
        return models

    @staticmethod
    def model_files(models: Mapping[str, Mapping[str, str | None]]) -> list[str]:
        return sorted({f for spec in models.values() for f in spec.values() if f})

    def routing_stats_triggers(self, wc: Any) -> dict[str, str]:
        """Square triggers to analyse: the run's own for a square attack, every square trigger for a clean run."""
        names = self.located_triggers() if wc.attack == CLEAN else [parse_attack(wc.attack)[0]]
        return {n: self.trigger_path(wc.dataset, n, wc.seed) for n in names}

    def routing_stats_targets(self, dataset: str) -> list[str]:
        attacks = [CLEAN] + [attack_name(t, r) for t in self.located_triggers() for r in self.rates]
        return [f"{RESULTS}/{dataset}/{m}/{a}/seed{s}/routing_stats.json"
                for m in self.routed_models() for a in attacks for s in self.seeds_for(a)]



class MergingPlan:
    """The merging study on ``merging.model``: a pMoE, or a control architecture with a slot table
    (PreAct-ResNet-18). Without routers there is nothing for ``tied`` to tie, so it would repeat ``free``: only
    ``free`` is planned (config_check refuses ``couplings: [tied]`` alone there); without expert channels the merged
    models are deployed but not Fine-Pruned."""

    def merging_kind(self):
        """The registered kind (capabilities) of the merging model."""
        return MODELS[self.config["models"][self.merge["model"]]["arch"]]

    def merging_couplings(self) -> list[str]:
        """merging.couplings as planned: ``tied`` only where the model has routers to tie to their experts."""
        couplings = list(self.merge["couplings"])
        return couplings if self.merging_kind().routing else [c for c in couplings if c != "tied"]

    def set_victims(self, name: str) -> list[tuple[str, str, int]]:
        """The victims of a merging set in order, as (label, trigger or 'benign', replica): replica k of a trigger
        is its (k+1)-th mention in the set."""
        seen: dict[str, int] = {}
        victims = []
        for member in self.merge["sets"][name]:
            replica = seen.get(member, 0)
            seen[member] = replica + 1
            victims.append((member if replica == 0 else f"{member}#{replica + 1}", member, replica))
        return victims

    @staticmethod
    def victim_dir(dataset: str, model: str, victim: str, replica: int | str, seed: int | str) -> str:
        return f"{RESULTS}/{dataset}/{model}/merging/victims/{victim}/r{replica}/seed{seed}"

    @staticmethod
    def victim_seed(wc: Any) -> int:
        return int(wc.seed) + REPLICA_SEED_STEP * int(wc.replica)

    def victim_poison(self, wc: Any) -> str:
        """The victim's training set: clean for 'benign', else its trigger at merging.rate with its own seed."""
        if wc.victim == "benign":
            return f"{RESULTS}/{wc.dataset}/poison/clean.safetensors"
        attack = attack_name(wc.victim, self.merge["rate"])
        return f"{RESULTS}/{wc.dataset}/poison/{attack}/seed{self.victim_seed(wc)}.safetensors"

    def victim_finetune(self) -> dict[str, Any]:
        return without(self.merge.get("finetune", {}), ["pack"])

    def set_victim_weights(self, wc: Any) -> list[str]:
        return [f"{self.victim_dir(wc.dataset, wc.model, trig, rep, wc.seed)}/weights.safetensors"
                for _, trig, rep in self.set_victims(wc.set)]

    def set_triggers(self, wc: Any) -> dict[str, str]:
        """Each poisoned victim's trigger, by victim label (the merged models' ASR is measured for each)."""
        return {
            label: self.trigger_path(wc.dataset, trig, int(wc.seed) + REPLICA_SEED_STEP * rep)
            for label, trig, rep in self.set_victims(wc.set)
            if trig != "benign"
        }

    def strategy_file(self, n: int, coupling: str) -> str:
        """The strategy of n models of the merging model's architecture (it depends on nothing else)."""
        return f"{RESULTS}/merging/strategies/{self.merging_kind().name}/n{n}_{coupling}.json"

    def set_strategy(self, wc: Any) -> str:
        return self.strategy_file(len(self.merge["sets"][wc.set]), wc.coupling)

    def defended_sets(self) -> list[str]:
        """The sets whose merged models defend_merged deploys and Fine-Prunes (merging.defended_sets, else all)."""
        if not self.merge["enabled"]:
            return []
        return list(self.merge.get("defended_sets", self.merge["sets"]))

    def merging_results(self, dataset: str, result: str = "selection.json", sets: Iterable[str] | None = None
                        ) -> list[str]:
        """One result file (select_candidate's, or defend_merged's merged_defense.json) per set, seed, coupling."""
        merge = self.merge
        return [
            f"{RESULTS}/{dataset}/{merge['model']}/merging/{name}/seed{s}/{c}/{result}"
            for name in (merge["sets"] if sets is None else sets)
            for s in range(merge["seeds"])
            for c in self.merging_couplings()
        ]

    def merging_strategies(self) -> list[tuple[int, str]]:
        """(number of models, coupling) of every MSD strategy the merging sets need (none when merging is off)."""
        if not self.merge["enabled"]:
            return []
        return sorted({(len(m), c) for m in self.merge["sets"].values() for c in self.merging_couplings()})

    def defend_merged_params(self) -> dict[str, Any]:
        """Fine-Pruning prunes expert channels: a merging model without them (merging_kind) is only deployed."""
        fp = self.fp
        prune = fp["enabled"] and self.merge["enabled"] and self.merging_kind().prunable_channels
        return {
            # fp32 alone when no deployment precision is configured: the reference the Fine-Pruning rows compare to
            "precisions": self.deploy["precisions"] or ["fp32"],
            "prune_rates": fp["prune_rates"] if prune else [],
            "fine_pruning": canonical({k: fp[k] for k in ("epochs", "lr", "mask")}) if prune else {},
            "train": self.finetune_recipe(quiet=True),
        }



class BlindspotPlan:

    def blindspot_triggers(self) -> list[str]:
        return self.blind.get("triggers") or self.triggers

    def blindspot_runs(self, dataset: str) -> list[tuple[str, str]]:
        """(run directory, attack) of every model the data- and input-level defenses examine."""
        if not self.blind["enabled"]:
            return []
        attacks = [CLEAN] + [attack_name(t, r) for t in self.blindspot_triggers() for r in self.blind["rates"]]
        return [
            (f"{RESULTS}/{dataset}/{m}/{a}/seed{s}", a)
            for m in self.models
            for a in attacks
            for s in self.seeds_for(a)[: self.blind["seeds"]]
        ]

    def blindspot_defenses(self) -> list[str]:
        """The registered defenses whose config block is there and not switched off (``enabled``)."""
        return [name for name in DEFENSES if self.config.get(name) is not None
                and self.config[name].get("enabled", True)]

    def defense_precisions(self, name: str) -> list[str]:
        """The blindspot precisions a defense runs at: all, or those its own block names too (``precisions``)."""
        own = self.config[name].get("precisions")
        return [p for p in self.blind["precisions"] if own is None or p in own]

    def defense_config(self, name: str) -> dict[str, Any]:
        """What a defense job reads of its config block: all but the keys that choose which jobs exist."""
        return without(self.config.get(name) or {}, DEFENSE_SELECTION_KEYS)

    def defense_applies(self, name: str, dataset: str, run_dir: str) -> bool:
        """Whether the model of a blindspot run has what the defense ``needs`` (a ModelKind capability such as
        routing; a defense that needs nothing applies to every model)."""
        needs = DEFENSES[name].needs
        if needs is None:
            return True
        # blindspot_runs' directories are f"{RESULTS}/{dataset}/{model}/{attack}/seed{seed}"
        model = run_dir[len(f"{RESULTS}/{dataset}/"):].split("/", 1)[0]
        return bool(getattr(MODELS[self.config["models"][model]["arch"]], needs))

    def defense_applications(self, dataset: str) -> list[DefenseApplication]:
        """Every defense of the blindspot table on every model it examines at every precision; a defense that
        removes backdoors rather than detecting them (``on_clean_models`` false) on the attacked models only, one
        that needs a model capability (``needs``) on the models that have it."""
        runs = self.blindspot_runs(dataset)
        return [DefenseApplication(name, run, attack, p)
                for name in self.blindspot_defenses()
                for run, attack in runs if (attack != CLEAN or DEFENSES[name].on_clean_models)
                and self.defense_applies(name, dataset, run)
                for p in self.defense_precisions(name)]

    def defense_triggers(self, wc: Any) -> dict[str, str]:
        """The run's own trigger; for a clean model every analysed trigger of its seed (its false positives)."""
        names = self.blindspot_triggers() if wc.attack == CLEAN else [parse_attack(wc.attack)[0]]
        return {n: self.trigger_path(wc.dataset, n, wc.seed) for n in names}

    def blindspot_inputs(self, dataset: str) -> dict[str, list[str]]:
        """Every defense summary of the table (Neural Cleanse's included), the deployed runs' ASR/BA, and the
        Fine-Pruned models as deployed."""
        runs = {run for run, _ in self.blindspot_runs(dataset)}
        return {
            "defenses": [app.path for app in self.defense_applications(dataset)],
            "deployed": [f"{run}/deployed.json" for run in sorted(runs)] if self.deploy["precisions"] else [],
            "fine_pruned": [t for t in self.deploy_targets(dataset) if "/fineprune/" in t],
        }

    # defenses whose jobs leave localisation maps (the localisation figure's columns, in this order)
    MAPPING_DEFENSES = ("router_ablation", "saliency_ablation")

    def localisation_entries(self, dataset: str) -> list[dict[str, Any]]:
        """The localisation figure's rows: per main-study model and blindspot trigger, its seed-0 model at the
        highest blindspot rate at the first blindspot precision, with the map files of each mapping defense that
        ran on it (empty when no mapping defense keeps maps)."""
        if not self.blind["enabled"]:
            return []
        defenses = [d for d in self.MAPPING_DEFENSES if d in self.blindspot_defenses() and self.config[d]["maps"]]
        rate, precision = max(self.blind["rates"], key=float), self.blind["precisions"][0]
        entries = []
        for model in self.models:
            for trigger in self.blindspot_triggers():
                run = f"{RESULTS}/{dataset}/{model}/{attack_name(trigger, rate)}/seed0"
                maps = {d: f"{run}/{d}/{precision}.safetensors" for d in defenses
                        if self.defense_applies(d, dataset, run) and precision in self.defense_precisions(d)}
                if maps:
                    entries.append({"model": model, "trigger": trigger, "rate": fmt_rate(rate),
                                    "precision": precision, "maps": maps})
        return entries
