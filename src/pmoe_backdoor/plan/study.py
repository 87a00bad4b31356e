"""The main study's plan: its runs, their triggers and poison records, Fine-Pruning, deployment, Neural Cleanse,
and the datasets' sources."""

from __future__ import annotations

import copy
import functools
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterable, Mapping

from ..attacks import TRAINING_TERMS, TRIGGERS
from ..data.files import defining_layer, resolve_config_path, source_digest
from ..models import MODELS
from ..naming import CLEAN, attack_name, fmt_rate, parse_attack
from ..study_checks import fine_prune_seed
from .common import FINETUNE_OVERRIDES, QUIET_FINETUNE_OVERRIDES, RESULTS, SOURCES_WITH_DATA, Run, canonical, without


class StudyPlan:
    """The main study of one validated config (defaults already filled in by the schema)."""

    def __init__(self, config: Mapping[str, Any], config_layers: list[tuple[Any, Mapping[str, Any]]] | None = None,
                 cwd: str | None = None):
        self.config = config
        # the config files as Snakemake merged them (lowest precedence first): a relative data path is taken from
        # the folder of the layer that set it
        self.config_layers = config_layers or []
        self.cwd = cwd or str(Path.cwd())
        self.datasets = list(config["datasets"])
        self.models = list(config.get("study_models") or config["models"])  # those the main study trains
        self.all_triggers = list(config["attack"]["triggers"])  # the main study's and those only merging names
        self.triggers = list(config.get("study_triggers") or self.all_triggers)  # those the main study trains
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
        return [m for m in self.models if MODELS[self.config["models"][m]["arch"]].routing]

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
        """The trigger's kind and pattern parameters (an attacker's training term is not part of the pattern)."""
        params = without(canonical(self.config["attack"]["triggers"][trigger]), TRAINING_TERMS)
        return params.pop("kind"), params

    def run_train(self, wc: Any) -> dict[str, Any]:
        """The run's training settings: the study's recipe, plus its trigger's ``router_evasion`` term for an
        adaptive attack (only there, so that adding one leaves every other run's settings, and results, as they
        were)."""
        evasion = None if wc.attack == CLEAN else self.config["attack"]["triggers"][parse_attack(wc.attack)[0]].get(
            "router_evasion")
        return dict(self.train, router_evasion=canonical(evasion)) if evasion else self.train

    def model_spec(self, model: str) -> dict[str, Any]:
        return canonical(self.config["models"][model])

    def paper_names(self) -> dict[str, str]:
        """Each dataset's name in the paper's tables (its own name unless the config says otherwise)."""
        return {d: spec.get("paper_name", d) for d, spec in self.config["datasets"].items()}

    def located_triggers(self) -> list[str]:
        """Triggers that write a fixed box of pixels (the square): routing statistics count how often its patch is
        routed."""
        return [t for t in self.triggers if TRIGGERS[self.config["attack"]["triggers"][t]["kind"]].patch_located]

    # ----- Fine-Pruning -----

    def fp_seed(self, run: int, rate_index: int) -> int:
        """The attack seed Fine-Pruning run ``run`` prunes at its ``rate_index``-th prune rate (model_per_rate)."""
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
