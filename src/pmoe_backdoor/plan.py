"""The study a validated config describes: its runs, defense applications and tables, as paths and params.

The Snakefile builds one :class:`Plan` from the config (after ``config_check``) and its rules ask it for their
inputs, targets and parameters; nothing here imports Snakemake or torch, so every decision about *which* jobs exist
and *what* each one is given is unit-tested in plain Python (tests/test_plan.py).

Functions that take ``wc`` accept Snakemake's wildcards or anything with the same attributes (``dataset``, ``model``,
``attack``, ``seed``, ...). Paths are relative to the working directory, under ``results/``.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterable, Mapping

from .datafiles import defining_layer, resolve_config_path, source_digest
from .naming import CLEAN, attack_name, fmt_rate, parse_attack

RESULTS = "results"
# a trigger's second victim in a merging set is poisoned with run seed + 100, its third with + 200, ...
REPLICA_SEED_STEP = 100
# dataset sources with local data: the file or folder is an input of prepare_data and its content is digested
SOURCES_WITH_DATA = ("npz", "imagefolder")
# the data- and input-level defenses of the blindspot table that have a rule of their own (Neural Cleanse and
# Fine-Pruning come from their own stages)
BLINDSPOT_DEFENSES = ("strip", "activation_clustering", "spectral_signatures")
# the training keys the fine-tuning inside Fine-Pruning and the merged models' defense do not read: they set
# their own epochs and lr (and no per-epoch evaluation), so a change of these must not rerun them
FINETUNE_OVERRIDES = ("epochs", "lr")
QUIET_FINETUNE_OVERRIDES = ("epochs", "lr", "eval_every")


def canonical(value: Any) -> Any:
    """A config block with its keys sorted at every level: Snakemake compares params as written, so key order
    alone must not make a job look changed."""
    if isinstance(value, Mapping):
        return {k: canonical(value[k]) for k in sorted(value)}
    if isinstance(value, (list, tuple)):
        return [canonical(v) for v in value]
    return value


def without(block: Mapping[str, Any], keys: Iterable[str]) -> dict[str, Any]:
    keys = set(keys)
    return canonical({k: v for k, v in block.items() if k not in keys})


@dataclass(frozen=True)
class Run:
    """One trained model of the main study: dataset, model, attack ('clean' or '{trigger}-{rate}') and seed."""

    dataset: str
    model: str
    attack: str
    seed: int

    @property
    def dir(self) -> str:
        return f"{RESULTS}/{self.dataset}/{self.model}/{self.attack}/seed{self.seed}"

    @property
    def trigger(self) -> str | None:
        return None if self.attack == CLEAN else parse_attack(self.attack)[0]


@dataclass(frozen=True)
class DefenseApplication:
    """One defense run on one model as deployed at one precision; ``path`` is its result file."""

    defense: str
    run_dir: str
    attack: str
    precision: str

    @property
    def path(self) -> str:
        return f"{self.run_dir}/{self.defense}/{self.precision}.json"


def table_files(name: str, extensions: Iterable[str] = ("csv", "md", "tex")) -> list[str]:
    return [f"{RESULTS}/tables/{name}.{ext}" for ext in extensions]


class Plan:
    """Everything the workflow derives from one validated config (defaults already filled in by the schema)."""

    def __init__(self, config: Mapping[str, Any], config_layers: list[tuple[Any, Mapping[str, Any]]] | None = None,
                 cwd: str | None = None):
        self.config = config
        # the config files as Snakemake merged them (lowest precedence first): a relative data path is taken from
        # the folder of the layer that set it
        self.config_layers = config_layers or []
        self.cwd = cwd or str(Path.cwd())
        self.datasets = list(config["datasets"])
        self.models = list(config["models"])
        self.triggers = list(config["attack"]["triggers"])
        self.rates = [fmt_rate(r) for r in config["attack"]["rates"]]
        self.attacks = [attack_name(t, r) for t in self.triggers for r in self.rates]
        self.target = config["attack"]["target"]
        self.fp = config["fine_pruning"]
        self.deploy = config["deployment"]
        self.nc = config["neural_cleanse"]
        self.merge = config["merging"]
        self.compress = config["compression_attack"]
        self.blind = config["blindspot"]
        self.analysis = config.get("analysis")
        # the training settings of one run (`pack` only says how runs are grouped into jobs, so it is not one)
        self.train = without(config["train"], ["pack"])
        self.pack = config["train"]["pack"]

    # ----- the main study: runs, triggers, poison records -----

    def routed_models(self) -> list[str]:
        """Models with routers (the pMoE): the ones routing analysis, Fine-Pruning of experts and merging apply to."""
        return [m for m in self.models if self.config["models"][m]["arch"] == "pmoe"]

    def seeds_for(self, attack: str) -> list[int]:
        seeds = self.config["seeds"]
        return list(range(seeds["clean"] if attack == CLEAN else seeds["attack"]))

    def runs(self, datasets: Iterable[str] | None = None) -> list[Run]:
        """Every (dataset, model, attack, seed) training run."""
        return [
            Run(d, m, a, s)
            for d in datasets or self.datasets
            for m in self.models
            for a in [CLEAN] + self.attacks
            for s in self.seeds_for(a)
        ]

    def run_dirs(self, datasets: Iterable[str] | None = None) -> list[str]:
        return [run.dir for run in self.runs(datasets)]

    def seed_packs(self, n: int) -> list[list[int]]:
        """Seeds 0..n-1 in groups of `train.pack` consecutive seeds (the last group may be smaller)."""
        return [list(range(start, min(start + self.pack, n))) for start in range(0, n, self.pack)]

    def pack_runs(self, wc: Any) -> list[SimpleNamespace]:
        """The runs (dataset, model, attack, seed wildcards) of the pack seeds{first}-{last}."""
        fields = {k: getattr(wc, k) for k in ("dataset", "model", "attack")}
        return [SimpleNamespace(**fields, seed=str(s)) for s in range(int(wc.first), int(wc.last) + 1)]

    def pack_of_run(self, wc: Any) -> str:
        """The packed job's folder that trains this run."""
        pack = next(p for p in self.seed_packs(len(self.seeds_for(wc.attack))) if int(wc.seed) in p)
        return f"{RESULTS}/{wc.dataset}/{wc.model}/{wc.attack}/packs/seeds{pack[0]}-{pack[-1]}"

    @staticmethod
    def trigger_path(dataset: str, trigger: str, seed: int | str) -> str:
        return f"{RESULTS}/{dataset}/triggers/{trigger}/seed{seed}.safetensors"

    def trigger_file(self, wc: Any) -> str | list:
        """The run's trigger file; none (an empty input) for a clean run."""
        if wc.attack == CLEAN:
            return []
        return self.trigger_path(wc.dataset, parse_attack(wc.attack)[0], wc.seed)

    def poison_file(self, wc: Any) -> str:
        """The run's poison record; a clean run's has nothing poisoned (reading one puts every training job at the
        same depth of the DAG, so that the report's rule graph, which keeps one job per rule and depth, shows each
        rule once)."""
        if wc.attack == CLEAN:
            return f"{RESULTS}/{wc.dataset}/poison/clean.safetensors"
        return f"{RESULTS}/{wc.dataset}/poison/{wc.attack}/seed{wc.seed}.safetensors"

    def trigger_params(self, trigger: str) -> tuple[str, dict[str, Any]]:
        params = canonical(self.config["attack"]["triggers"][trigger])
        return params.pop("kind"), params

    def model_spec(self, model: str) -> dict[str, Any]:
        return canonical(self.config["models"][model])

    def paper_names(self) -> dict[str, str]:
        """Each dataset's name in the paper's tables (its own name unless the config says otherwise)."""
        return {d: spec.get("paper_name", d) for d, spec in self.config["datasets"].items()}

    def square_triggers(self) -> list[str]:
        return [t for t in self.triggers if self.config["attack"]["triggers"][t]["kind"] == "square"]

    # ----- Fine-Pruning -----

    def fp_seed(self, run: int, rate_index: int) -> int:
        """The attack seed Fine-Pruning run ``run`` prunes at its ``rate_index``-th prune rate (model_per_rate)."""
        from .config_check import fine_prune_seed

        return fine_prune_seed(run, rate_index, len(self.fp["prune_rates"]), self.fp["model_per_rate"])

    def fine_prune_jobs(self) -> list[tuple[str, float]]:
        """(trained model's run directory, prune rate) of every Fine-Pruning job, before the fine-tuning set."""
        fp = self.fp
        if not fp["enabled"]:
            return []
        return [
            (f"{RESULTS}/{d}/{m}/{attack_name(t, r)}/seed{self.fp_seed(run, j)}", p)
            for d in fp["datasets"]
            for m in fp["models"]
            for t in fp["triggers"]
            for r in fp["poison_rates"]
            for run in range(fp["runs"])
            for j, p in enumerate(fp["prune_rates"])
        ]

    def fine_prune_runs(self) -> list[str]:
        """The trained models Fine-Pruning starts from, each once."""
        return list(dict.fromkeys(run for run, _ in self.fine_prune_jobs()))

    def fine_prune_targets(self) -> list[str]:
        return [f"{run}/fineprune/{v}/{fmt_rate(p)}/metrics.json"
                for run, p in self.fine_prune_jobs() for v in self.fp["finetune_data"]]

    def prune_sweep_targets(self) -> list[str]:
        if not self.fp.get("sweep"):  # optional: no sweep unless rates are listed
            return []
        return [f"{run}/prune_sweep.json" for run in self.fine_prune_runs()]

    def fine_prune_params(self) -> dict[str, Any]:
        """The Fine-Pruning keys one fine_prune job depends on (the others only choose which jobs exist); none when
        Fine-Pruning is off (the rule is still read)."""
        return canonical({k: self.fp[k] for k in ("epochs", "lr", "activation_images", "mask") if k in self.fp})

    def finetune_recipe(self, quiet: bool = False) -> dict[str, Any]:
        """The training keys a defense's fine-tuning reads (it sets its own epochs and lr; ``quiet``: and no
        per-epoch evaluation)."""
        return without(self.train, QUIET_FINETUNE_OVERRIDES if quiet else FINETUNE_OVERRIDES)

    # ----- deployment and Neural Cleanse -----

    def deploy_targets(self, dataset: str) -> list[str]:
        """Every trained and every Fine-Pruned model of a dataset at every deployment precision."""
        if not self.deploy["precisions"]:
            return []
        runs = self.run_dirs([dataset]) + [
            f"{run}/fineprune/{v}/{fmt_rate(p)}"
            for run, p in self.fine_prune_jobs()
            if run.startswith(f"{RESULTS}/{dataset}/")
            for v in self.fp["finetune_data"]
        ]
        return [f"{run}/deployed.json" for run in runs]

    def nc_runs(self, dataset: str) -> list[tuple[str, str, int]]:
        """(run directory, attack, seed) of every model the detection table runs Neural Cleanse on."""
        if not self.nc["enabled"]:
            return []
        attacks = [CLEAN] + [attack_name(t, r) for t in self.triggers for r in self.nc["rates"]]
        return [
            (f"{RESULTS}/{dataset}/{m}/{a}/seed{s}", a, s)
            for m in self.models
            for a in attacks
            for s in self.seeds_for(a)[: self.nc["seeds"]]
        ]

    def nc_targets(self, dataset: str) -> list[str]:
        return [f"{run}/neural_cleanse/{p}.json" for run, _, _ in self.nc_runs(dataset) for p in self.nc["precisions"]]

    def nc_mask_entries(self, dataset: str) -> dict[str, list[str]]:
        """Seed-0 models at the first Neural Cleanse rate, clean and per trigger, at each precision, for the
        figure."""
        entries: dict[str, list[str]] = {"masks": [], "trigger_of_entry": [], "labels": []}
        for run, attack, seed in self.nc_runs(dataset):
            if seed != 0 or (attack != CLEAN and parse_attack(attack)[1] != float(self.nc["rates"][0])):
                continue
            trigger = "" if attack == CLEAN else parse_attack(attack)[0]
            for p in self.nc["precisions"]:
                entries["masks"].append(f"{run}/neural_cleanse/{p}.safetensors")
                entries["trigger_of_entry"].append(self.trigger_path(dataset, trigger, 0) if trigger else "")
                entries["labels"].append(f"{attack} · {p}")
        entries["triggers"] = sorted({t for t in entries["trigger_of_entry"] if t})
        return entries

    def nc_optimizer(self) -> dict[str, Any]:
        """Neural Cleanse's optimizer keys and, only when it is not the default 'fast', its schedule: results of
        the fast schedule keep the parameters they were made with (and are not rerun). Every Neural Cleanse rule
        (the detection and blindspot tables' and the compression study's) takes its settings from here."""
        schedule = self.nc.get("schedule", "fast")
        return canonical({**self.nc.get("optimizer", {}), **({"schedule": schedule} if schedule != "fast" else {})})

    # ----- routing analysis -----

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
        names = self.square_triggers() if wc.attack == CLEAN else [parse_attack(wc.attack)[0]]
        return {n: self.trigger_path(wc.dataset, n, wc.seed) for n in names}

    def routing_stats_targets(self, dataset: str) -> list[str]:
        attacks = [CLEAN] + [attack_name(t, r) for t in self.square_triggers() for r in self.rates]
        return [f"{RESULTS}/{dataset}/{m}/{a}/seed{s}/routing_stats.json"
                for m in self.routed_models() for a in attacks for s in self.seeds_for(a)]

    # ----- merging -----

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

    @staticmethod
    def strategy_file(n: int, coupling: str) -> str:
        return f"{RESULTS}/merging/strategies/n{n}_{coupling}.json"

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
            for c in merge["couplings"]
        ]

    def merging_strategies(self) -> list[tuple[int, str]]:
        """(number of models, coupling) of every MSD strategy the merging sets need (none when merging is off)."""
        if not self.merge["enabled"]:
            return []
        return sorted({(len(m), c) for m in self.merge["sets"].values() for c in self.merge["couplings"]})

    def defend_merged_params(self) -> dict[str, Any]:
        fp = self.fp
        return {
            # fp32 alone when no deployment precision is configured: the reference the Fine-Pruning rows compare to
            "precisions": self.deploy["precisions"] or ["fp32"],
            "prune_rates": fp["prune_rates"] if fp["enabled"] else [],
            "fine_pruning": canonical({k: fp[k] for k in ("epochs", "lr", "mask")}) if fp["enabled"] else {},
            "train": self.finetune_recipe(quiet=True),
        }

    # ----- compression-activated backdoors -----
    # An attack model lives at {dataset}/{model}/compression/{variant}-{target}/seed{seed}: the `attack` wildcard is
    # "<variant>-<target label>", so the Neural Cleanse job script (which names runs by that wildcard) serves it too.

    @staticmethod
    def compression_dir(dataset: str, model: str, attack: str, seed: int | str) -> str:
        return f"{RESULTS}/{dataset}/{model}/compression/{attack}/seed{seed}"

    @staticmethod
    def compression_target(wc: Any) -> int:
        """The target label of an attack model, from its `attack` wildcard "<variant>-<target>"."""
        return int(wc.attack.rsplit("-", 1)[1])

    def compression_train_params(self, wc: Any) -> dict[str, Any]:
        """The attack recipe of one model: the train block, its variant, the pruning keys, the dataset's lr drop."""
        variant = wc.attack.rsplit("-", 1)[0]
        prune = self.compress["prune"]
        cfg = dict(self.compress["train"], variant=variant)
        for key, name in (("rate", "prune_rate"), ("lower", "prune_lower"), ("upper", "prune_upper"),
                          ("alpha", "alpha")):
            if prune.get(key) is not None:
                cfg[name] = prune[key]
        by_dataset = self.compress.get("lr_drop_epoch_by_dataset", {})
        if wc.dataset in by_dataset:
            cfg["lr_drop_epoch"] = by_dataset[wc.dataset]
        return canonical(cfg)

    def compression_max_fp32_asr(self, wc: Any) -> float:
        return self.compress.get("max_fp32_asr_by_dataset", {}).get(wc.dataset, self.compress["max_fp32_asr"])

    def compression_runs(self, dataset: str) -> list[tuple[str, str, int]]:
        """(model, attack wildcard, seed) of every attack model of a dataset."""
        c = self.compress
        if not c["enabled"] or dataset not in c["datasets"]:
            return []
        targets = c.get("targets_by_dataset", {}).get(dataset, c["targets"])
        return [(c["model"], f"{v}-{t}", s) for v in c["variants"] for t in targets for s in range(c["seeds"])]

    def compression_eval_targets(self, dataset: str) -> list[str]:
        return [f"{self.compression_dir(dataset, m, a, s)}/evaluation.json"
                for m, a, s in self.compression_runs(dataset)]

    def compression_nc_targets(self, dataset: str) -> list[str]:
        """Neural Cleanse on each released (fp32) attack model, when the neural_cleanse block is enabled."""
        if not self.nc["enabled"]:
            return []
        return [f"{self.compression_dir(dataset, m, a, s)}/neural_cleanse/fp32.json"
                for m, a, s in self.compression_runs(dataset)]

    def compression_clean_nc(self, dataset: str) -> list[str]:
        """The clean models' fp32 Neural Cleanse summaries (the negatives of the ROC-AUC), when the study has them:
        those of the detection table and, when the blindspot table runs Neural Cleanse at fp32, its clean seeds."""
        if not self.nc["enabled"] or "fp32" not in self.nc["precisions"]:
            return []
        runs = {run for run, attack, _ in self.nc_runs(dataset) if attack == CLEAN}
        if "fp32" in self.blind.get("precisions", []):
            runs |= {run for run, attack in self.blindspot_runs(dataset) if attack == CLEAN}
        return [f"{run}/neural_cleanse/fp32.json" for run in sorted(runs)]

    # ----- the quantization-blindspot table -----

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

    def defense_applications(self, dataset: str) -> list[DefenseApplication]:
        """Every defense of the blindspot table on every model it examines at every precision (Neural Cleanse at
        the precisions both its block and the blindspot block name)."""
        runs = self.blindspot_runs(dataset)
        apps = [DefenseApplication(d, run, attack, p)
                for run, attack in runs for d in BLINDSPOT_DEFENSES for p in self.blind["precisions"]]
        if self.nc["enabled"]:
            precisions = [p for p in self.nc["precisions"] if p in self.blind["precisions"]]
            apps += [DefenseApplication("neural_cleanse", run, attack, p) for run, attack in runs for p in precisions]
        return apps

    def strip_triggers(self, wc: Any) -> dict[str, str]:
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

    # ----- what `snakemake` builds by default -----

    def report_targets(self) -> list[str]:
        targets = [f"{RESULTS}/tables/runs_{d}.csv" for d in self.datasets] + [f"{RESULTS}/figures/asr_ba_vs_rate.png"]
        targets += [f for d in self.datasets for f in table_files(f"attacks_{d}")]
        if self.fp["enabled"]:
            targets += table_files("fine_pruning")
            if self.fp.get("sweep"):
                targets.append(f"{RESULTS}/figures/prune_sweep.png")
        return targets

    def analysis_targets(self) -> list[str]:
        if self.analysis is None:
            return []
        routed = self.routed_models()
        targets = [f"{RESULTS}/figures/trigger_examples_{d}.png" for d in self.datasets]
        for d in self.datasets:
            for m in routed:
                targets += [f"{RESULTS}/figures/patch_maps_{d}_{m}.png", f"{RESULTS}/figures/patch_values_{d}_{m}.png"]
            if routed and self.square_triggers():
                targets += table_files(f"routing_{d}")
                targets.append(f"{RESULTS}/figures/routing_{d}.png")
        if self.fp["enabled"]:
            targets += [f"{RESULTS}/figures/fineprune_patch_maps_{d}_{m}.png"
                        for d in self.fp["datasets"] for m in self.fp["models"]]
        return targets

    def beyond_targets(self) -> list[str]:
        targets = []
        for d in self.datasets:
            if self.deploy["precisions"]:
                targets += table_files(f"precision_{d}")
            if self.nc["enabled"]:
                targets += table_files(f"detection_{d}")
                targets.append(f"{RESULTS}/figures/nc_masks_{d}.png")
        return targets

    def merging_targets(self) -> list[str]:
        if not self.merge["enabled"]:
            return []
        tables = ["merging"] + (["merged_defense"] if self.defended_sets() else [])
        targets = [f for t in tables for d in self.merge["datasets"] for f in table_files(f"{t}_{d}")]
        return targets + [f"{RESULTS}/figures/msd_strategies.png"]

    def compression_targets(self) -> list[str]:
        if not self.compress["enabled"]:
            return []
        return [f for d in self.compress["datasets"] for f in table_files(f"compression_{d}")]

    def blindspot_targets(self) -> list[str]:
        if not self.blind["enabled"]:
            return []
        return [f for d in self.datasets for f in table_files(f"blindspot_{d}")] + [
            f"{RESULTS}/figures/blindspot_{d}.png" for d in self.datasets
        ]

    def all_targets(self) -> list[str]:
        targets = (self.report_targets() + self.analysis_targets() + self.beyond_targets() + self.merging_targets()
                   + self.compression_targets() + self.blindspot_targets())
        # what the report shows besides figures: each table's HTML page (from the table's own job), the config
        tables = [t for t in targets if t.startswith(f"{RESULTS}/tables/") and t.endswith((".md", ".csv"))]
        pages = dict.fromkeys(t.rsplit(".", 1)[0] + ".html" for t in tables)
        return targets + list(pages) + [f"{RESULTS}/config/config.html"]

    def training_jobs(self) -> int:
        """How many models the study trains: the main runs, the merging victims and the compression attacks."""
        victims = sum(len(self.merge["sets"][s]) for s in self.merge["sets"]) * self.merge["seeds"] * len(
            self.merge["datasets"]) if self.merge["enabled"] else 0
        return len(self.runs()) + victims + sum(len(self.compression_runs(d)) for d in self.datasets)

    # ----- datasets: the data file or folder of a dataset and its content digest -----

    def dataset_path(self, name: str) -> str:
        """A dataset's `path`, absolute: a relative one is taken from the folder of the config layer that set it
        (the last to set it wins), or from the working directory if no layer did."""
        base = defining_layer(("datasets", name, "path"), self.config_layers)
        return resolve_config_path(self.config["datasets"][name]["path"], self.cwd if base is None else base)

    def dataset_input(self, name: str) -> str | list:
        """The file or folder prepare_data reads (none for a download or synthetic data)."""
        block = self.config["datasets"][name]
        return self.dataset_path(name) if block.get("source") in SOURCES_WITH_DATA and "path" in block else []

    def dataset_spec(self, name: str) -> dict[str, Any]:
        """The dataset's config block for prepare_data: keys sorted, `path` absolute and, for an npz file or an
        image folder, `digest`, its content's sha256 (computed once per Plan; the job checks it again)."""
        return copy.deepcopy(self._dataset_spec(name))

    @functools.cache  # noqa: B019  (one Plan per Snakemake process; the digest of a large folder is costly)
    def _dataset_spec(self, name: str) -> dict[str, Any]:
        spec = dict(self.config["datasets"][name])
        if spec.get("source") in SOURCES_WITH_DATA and "path" in spec:
            spec["path"] = self.dataset_path(name)
            # the content, not the mtime: a file replaced under its old mtime reruns prepare_data and what follows
            spec["digest"] = source_digest(spec["source"], spec["path"])
        return canonical(spec)
