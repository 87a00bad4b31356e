# Target lists, wildcard constraints and parameter helpers shared by every rule.

import copy
import functools
import re
from pathlib import Path
from types import SimpleNamespace

from snakemake.common.configfile import load_configfile
from snakemake.exceptions import WorkflowError

from pmoe_backdoor.config_check import check_fine_pruning_seeds, fine_prune_seed
from pmoe_backdoor.datafiles import defining_layer, resolve_config_path, source_digest
from pmoe_backdoor.naming import attack_name, fmt_rate, parse_attack


RESULTS = "results"


def check_rates(cfg, rates, where):
    attack_rates = [float(r) for r in cfg["attack"]["rates"]]
    for rate in rates:
        if float(rate) not in attack_rates:
            raise ValueError(f"config: {where} has {rate}, which is not one of attack.rates {attack_rates}")


def check_config(cfg):
    """Cross-field checks the JSON schema cannot express; fail before any job starts."""
    names = {"datasets": cfg["datasets"], "models": cfg["models"], "triggers": cfg["attack"]["triggers"]}
    for group, entries in names.items():
        for name in entries:
            if not re.fullmatch(r"[A-Za-z0-9_]+", name) or name == "clean":
                raise ValueError(
                    f"config: {group} name {name!r} must be letters, digits or '_' and not 'clean'"
                )
    analysis = cfg.get("analysis")
    if analysis is not None:
        check_rates(cfg, [analysis["rate"]], "analysis.rate")
        if analysis["seed"] >= min(cfg["seeds"]["clean"], cfg["seeds"]["attack"]):
            raise ValueError(f"config: analysis.seed {analysis['seed']} has no run (seeds start at 0)")
        for name in analysis.get("classes_by_dataset", {}):
            if name not in cfg["datasets"]:
                raise ValueError(f"config: analysis.classes_by_dataset names {name!r}, not in 'datasets'")
    nc = cfg["neural_cleanse"]
    if nc["enabled"]:
        check_rates(cfg, nc["rates"], "neural_cleanse.rates")
    fp = cfg["fine_pruning"]
    if fp["enabled"]:
        for key, pool in (("datasets", "datasets"), ("models", "models")):
            for name in fp[key]:
                if name not in cfg[pool]:
                    raise ValueError(f"config: fine_pruning.{key} names {name!r}, which is not in '{pool}'")
        for trig in fp["triggers"]:
            if trig not in cfg["attack"]["triggers"]:
                raise ValueError(f"config: fine_pruning.triggers names {trig!r}, not in attack.triggers")
        check_rates(cfg, fp["poison_rates"], "fine_pruning.poison_rates")
        for model in fp["models"]:
            if cfg["models"][model]["arch"] != "pmoe":
                raise ValueError(f"config: fine_pruning.models names {model!r}: Fine-Pruning needs arch 'pmoe'")
        check_fine_pruning_seeds(fp, cfg["seeds"]["attack"])


def check_cluster_account():
    """profiles/slurm ships a placeholder account: stop with a clear message before anything is submitted."""
    defaults = workflow.resource_settings.default_resources
    account = defaults.get("slurm_account") if hasattr(defaults, "get") else None
    if account is not None and str(account.raw) == "CHANGE_ME":
        raise WorkflowError(
            "profiles/slurm: slurm_account is still the placeholder CHANGE_ME; set default-resources: "
            "slurm_account in profiles/slurm/config.yaml to your allocation (sacctmgr show assoc user=$USER)"
        )


check_config(config)
check_cluster_account()

DATASETS = list(config["datasets"])
MODELS = list(config["models"])
PMOE_MODELS = [m for m in MODELS if config["models"][m]["arch"] == "pmoe"]
TRIGGERS = list(config["attack"]["triggers"])
RATES = [fmt_rate(r) for r in config["attack"]["rates"]]
ATTACKS = [attack_name(t, r) for t in TRIGGERS for r in RATES]
# optional blocks: the schema fills in their defaults (disabled), so every rule reads them the same way
FP = config["fine_pruning"]
DEPLOY = config["deployment"]
NC = config["neural_cleanse"]
# the Fine-Pruning keys one fine_prune job depends on (the others only choose which jobs exist)
FP_JOB_KEYS = ("epochs", "lr", "activation_images", "mask")


wildcard_constraints:
    dataset="|".join(DATASETS),
    model="|".join(MODELS),
    trigger="|".join(TRIGGERS),
    rate=r"[0-9]+(\.[0-9]+)?",
    attack=r"clean|[A-Za-z0-9_]+-[0-9]+(\.[0-9]+)?",
    seed=r"[0-9]+",
    first=r"[0-9]+",
    last=r"[0-9]+",
    prune=r"[0-9]+(\.[0-9]+)?",
    variant="authors|clean",
    precision="fp32|int8_dynamic|int8|int4",
    victim=r"[A-Za-z0-9_]+",
    replica=r"[0-9]+",
    coupling="free|tied",
    n=r"[0-9]+",
    set=r"[A-Za-z0-9_]+",


def canonical(value):
    """A config block with its keys sorted at every level: Snakemake compares params as written, so key order
    alone must not make a job look changed."""
    if isinstance(value, dict):
        return {k: canonical(value[k]) for k in sorted(value)}
    if isinstance(value, list):
        return [canonical(v) for v in value]
    return value


# the training settings of one run (`pack` only says how runs are grouped into jobs, so it is not one of them)
TRAIN = canonical({k: v for k, v in config["train"].items() if k != "pack"})
PACK = config["train"]["pack"]


def seed_packs(n):
    """Seeds 0..n-1 in groups of `train.pack` consecutive seeds (the last group may be smaller)."""
    return [list(range(start, min(start + PACK, n))) for start in range(0, n, PACK)]


def pack_runs(wildcards):
    """The runs (dataset, model, attack, seed wildcards) of the pack seeds{first}-{last}."""
    return [
        SimpleNamespace(**{**dict(wildcards.items()), "seed": str(s)})
        for s in range(int(wildcards.first), int(wildcards.last) + 1)
    ]


def pack_of_run(wildcards):
    """The packed job's folder that trains this run."""
    n = len(seeds_for(wildcards.attack))
    pack = next(p for p in seed_packs(n) if int(wildcards.seed) in p)
    run = f"{RESULTS}/{wildcards.dataset}/{wildcards.model}/{wildcards.attack}"
    return f"{run}/packs/seeds{pack[0]}-{pack[-1]}"


def seeds_for(attack):
    n = config["seeds"]["clean"] if attack == "clean" else config["seeds"]["attack"]
    return list(range(n))


def run_dirs(datasets=None):
    """Every (dataset, model, attack, seed) training run as its results directory."""
    return [
        f"{RESULTS}/{d}/{m}/{a}/seed{s}"
        for d in datasets or DATASETS
        for m in MODELS
        for a in ["clean"] + ATTACKS
        for s in seeds_for(a)
    ]


def trigger_file(wildcards):
    if wildcards.attack == "clean":
        return []
    trigger, _ = parse_attack(wildcards.attack)
    return f"{RESULTS}/{wildcards.dataset}/triggers/{trigger}/seed{wildcards.seed}.safetensors"


def poison_file(wildcards):
    """The run's poison record; a clean run's has nothing poisoned (reading one puts every training job at the same
    depth of the DAG, so that the report's rule graph, which keeps one job per rule and depth, shows each rule once)."""
    if wildcards.attack == "clean":
        return f"{RESULTS}/{wildcards.dataset}/poison/clean.safetensors"
    return f"{RESULTS}/{wildcards.dataset}/poison/{wildcards.attack}/seed{wildcards.seed}.safetensors"


def trigger_params(trigger):
    params = canonical(config["attack"]["triggers"][trigger])
    return params.pop("kind"), params


def paper_names():
    """Each dataset's name in the paper's tables (its own name unless the config says otherwise)."""
    return {d: spec.get("paper_name", d) for d, spec in config["datasets"].items()}


def fp_seed(run, rate_index):
    """The attack seed Fine-Pruning run ``run`` prunes at its ``rate_index``-th prune rate (model_per_rate)."""
    return fine_prune_seed(run, rate_index, len(FP["prune_rates"]), FP.get("model_per_rate", "shared"))


def fine_prune_jobs():
    """(trained model's run directory, prune rate) of every Fine-Pruning job, before the fine-tuning set."""
    if not FP["enabled"]:
        return []
    return [
        (f"{RESULTS}/{d}/{m}/{attack_name(t, r)}/seed{fp_seed(run, j)}", p)
        for d in FP["datasets"]
        for m in FP["models"]
        for t in FP["triggers"]
        for r in FP["poison_rates"]
        for run in range(FP["runs"])
        for j, p in enumerate(FP["prune_rates"])
    ]


def fine_prune_runs():
    """The trained models Fine-Pruning starts from, each once."""
    return list(dict.fromkeys(run for run, _ in fine_prune_jobs()))


def fine_prune_targets():
    return [
        f"{run}/fineprune/{v}/{fmt_rate(p)}/metrics.json" for run, p in fine_prune_jobs() for v in FP["finetune_data"]
    ]


def prune_sweep_targets():
    if not FP.get("sweep"):  # optional: no sweep unless rates are listed
        return []
    return [f"{run}/prune_sweep.json" for run in fine_prune_runs()]


# ----- merging (issue 11) -----

MERGE = config["merging"]
REPLICA_SEED_STEP = 100  # a trigger's second victim in a set is poisoned with run seed + 100, its third + 200, ...


def check_merging(cfg):
    merge = cfg["merging"]
    if not merge["enabled"]:
        return
    if cfg["models"].get(merge["model"], {}).get("arch") != "pmoe":
        raise ValueError(f"config: merging.model {merge['model']!r} must name a pmoe model of 'models'")
    for name in merge["datasets"]:
        if name not in cfg["datasets"]:
            raise ValueError(f"config: merging.datasets names {name!r}, which is not in 'datasets'")
    if merge["seeds"] > cfg["seeds"]["clean"]:
        raise ValueError(f"config: merging.seeds ({merge['seeds']}) exceeds seeds.clean ({cfg['seeds']['clean']}): "
                         "each ancestor is the clean run of its seed")
    for name, members in merge["sets"].items():
        if not re.fullmatch(r"[A-Za-z0-9_]+", name):
            raise ValueError(f"config: merging.sets name {name!r} must be letters, digits or '_'")
        for member in members:
            if member != "benign" and member not in cfg["attack"]["triggers"]:
                raise ValueError(f"config: merging.sets.{name} names {member!r}: not 'benign' nor in attack.triggers")
    for name in merge.get("defended_sets", []):
        if name not in merge["sets"]:
            raise ValueError(f"config: merging.defended_sets names {name!r}, which is not in merging.sets")


def set_victims(name):
    """The victims of a merging set in order, as (label, trigger or 'benign', replica): replica k of a trigger is
    its (k+1)-th mention in the set."""
    seen = {}
    victims = []
    for member in MERGE["sets"][name]:
        replica = seen.get(member, 0)
        seen[member] = replica + 1
        victims.append((member if replica == 0 else f"{member}#{replica + 1}", member, replica))
    return victims


def victim_dir(dataset, model, victim, replica, seed):
    return f"{RESULTS}/{dataset}/{model}/merging/victims/{victim}/r{replica}/seed{seed}"


def victim_poison(wildcards):
    """The victim's training set: clean for 'benign', else its trigger at merging.rate with its own poison seed."""
    if wildcards.victim == "benign":
        return f"{RESULTS}/{wildcards.dataset}/poison/clean.safetensors"
    seed = int(wildcards.seed) + REPLICA_SEED_STEP * int(wildcards.replica)
    return f"{RESULTS}/{wildcards.dataset}/poison/{attack_name(wildcards.victim, MERGE['rate'])}/seed{seed}.safetensors"


def set_victim_weights(wildcards):
    return [
        f"{victim_dir(wildcards.dataset, wildcards.model, trig, rep, wildcards.seed)}/weights.safetensors"
        for _, trig, rep in set_victims(wildcards.set)
    ]


def set_triggers(wildcards):
    """Each poisoned victim's trigger, by victim label (the merged models' ASR is measured for each)."""
    return {
        label: f"{RESULTS}/{wildcards.dataset}/triggers/{trig}/seed{int(wildcards.seed) + REPLICA_SEED_STEP * rep}"
        ".safetensors"
        for label, trig, rep in set_victims(wildcards.set)
        if trig != "benign"
    }


def strategy_file(n, coupling):
    return f"{RESULTS}/merging/strategies/n{n}_{coupling}.json"


def defended_sets():
    """The sets whose merged models defend_merged deploys and Fine-Pruned (merging.defended_sets, else all)."""
    if not MERGE["enabled"]:
        return []
    return list(MERGE.get("defended_sets", MERGE["sets"]))


def merging_results(dataset, result="selection.json", sets=None):
    """One result file (select_candidate's, or defend_merged's merged_defense.json) per set, seed and coupling."""
    return [
        f"{RESULTS}/{dataset}/{MERGE['model']}/merging/{name}/seed{s}/{c}/{result}"
        for name in (MERGE["sets"] if sets is None else sets)
        for s in range(MERGE["seeds"])
        for c in MERGE["couplings"]
    ]


def merging_strategies():
    """(number of models, coupling) of every MSD strategy the merging sets need (none when merging is off)."""
    if not MERGE["enabled"]:
        return []
    return sorted({(len(m), c) for m in MERGE["sets"].values() for c in MERGE["couplings"]})


def merging_targets():
    if not MERGE["enabled"]:
        return []
    tables = ["merging"] + (["merged_defense"] if defended_sets() else [])
    targets = [
        f"{RESULTS}/tables/{t}_{d}.{ext}" for t in tables for d in MERGE["datasets"] for ext in ("csv", "md", "tex")
    ]
    return targets + [f"{RESULTS}/figures/msd_strategies.png"]


check_merging(config)


def report_targets():
    targets = [f"{RESULTS}/tables/runs_{d}.csv" for d in DATASETS] + [f"{RESULTS}/figures/asr_ba_vs_rate.png"]
    targets += [f"{RESULTS}/tables/attacks_{d}.{ext}" for d in DATASETS for ext in ("csv", "md", "tex")]
    if FP["enabled"]:
        targets += [f"{RESULTS}/tables/fine_pruning.{ext}" for ext in ("csv", "md", "tex")]
        if FP.get("sweep"):
            targets.append(f"{RESULTS}/figures/prune_sweep.png")
    return targets


def analysis_targets():
    if "analysis" not in config:
        return []
    targets = [f"{RESULTS}/figures/trigger_examples_{d}.png" for d in DATASETS]
    for d in DATASETS:
        for m in PMOE_MODELS:
            targets += [f"{RESULTS}/figures/patch_maps_{d}_{m}.png", f"{RESULTS}/figures/patch_values_{d}_{m}.png"]
        if PMOE_MODELS and any(t["kind"] == "square" for t in config["attack"]["triggers"].values()):
            targets += [f"{RESULTS}/tables/routing_{d}.{ext}" for ext in ("csv", "md", "tex")]
            targets.append(f"{RESULTS}/figures/routing_{d}.png")
    if FP["enabled"]:
        targets += [f"{RESULTS}/figures/fineprune_patch_maps_{d}_{m}.png" for d in FP["datasets"] for m in FP["models"]]
    return targets


def deploy_targets(dataset):
    """Every trained and every Fine-Pruned model of a dataset at every deployment precision."""
    runs = [r for r in run_dirs([dataset])] + [
        f"{run}/fineprune/{v}/{fmt_rate(p)}"
        for run, p in fine_prune_jobs()
        if run.startswith(f"{RESULTS}/{dataset}/")
        for v in FP["finetune_data"]
    ]
    return [f"{run}/deployed.json" for run in runs] if DEPLOY["precisions"] else []


def nc_runs(dataset):
    if not NC["enabled"]:
        return []
    attacks = ["clean"] + [attack_name(t, r) for t in TRIGGERS for r in NC["rates"]]
    return [
        (f"{RESULTS}/{dataset}/{m}/{a}/seed{s}", a, s)
        for m in MODELS
        for a in attacks
        for s in seeds_for(a)[: NC["seeds"]]
    ]


def nc_targets(dataset):
    return [f"{run}/neural_cleanse/{p}.json" for run, _, _ in nc_runs(dataset) for p in NC["precisions"]]


def nc_mask_entries(dataset):
    """Seed-0 models at the first Neural Cleanse rate, clean and per trigger, at each precision, for the figure."""
    entries = {"masks": [], "trigger_of_entry": [], "labels": []}
    for run, attack, seed in nc_runs(dataset):
        if seed != 0 or (attack != "clean" and parse_attack(attack)[1] != float(NC["rates"][0])):
            continue
        trigger = "" if attack == "clean" else parse_attack(attack)[0]
        for p in NC["precisions"]:
            entries["masks"].append(f"{run}/neural_cleanse/{p}.safetensors")
            entries["trigger_of_entry"].append(
                f"{RESULTS}/{dataset}/triggers/{trigger}/seed0.safetensors" if trigger else ""
            )
            entries["labels"].append(f"{attack} · {p}")
    entries["triggers"] = sorted({t for t in entries["trigger_of_entry"] if t})
    return entries


def beyond_targets():
    targets = []
    for d in DATASETS:
        if DEPLOY["precisions"]:
            targets += [f"{RESULTS}/tables/precision_{d}.{ext}" for ext in ("csv", "md", "tex")]
        if NC["enabled"]:
            targets += [f"{RESULTS}/tables/detection_{d}.{ext}" for ext in ("csv", "md", "tex")]
            targets.append(f"{RESULTS}/figures/nc_masks_{d}.png")
    return targets


def all_targets():
    targets = report_targets() + analysis_targets() + beyond_targets() + merging_targets() + compression_targets()
    targets += blindspot_targets()
    # what the report shows besides figures: each table's HTML page (from the table's own job), the config record
    tables = [t for t in targets if t.startswith(f"{RESULTS}/tables/") and t.endswith((".md", ".csv"))]
    pages = dict.fromkeys(t.rsplit(".", 1)[0] + ".html" for t in tables)
    return targets + list(pages) + [f"{RESULTS}/config/config.html"]


# ----- routing analysis -----


def analysis_classes(dataset):
    return config["analysis"].get("classes_by_dataset", {}).get(dataset, config["analysis"]["classes"])


def analysis_models(wildcards):
    """The clean model and each trigger's model at the analysis rate, all at the analysis seed."""
    seed, rate = config["analysis"]["seed"], fmt_rate(config["analysis"]["rate"])
    base = f"{RESULTS}/{wildcards.dataset}/{wildcards.model}"
    models = {"clean": {"weights": f"{base}/clean/seed{seed}/weights.safetensors", "trigger": None}}
    for trig in TRIGGERS:
        models[f"{trig} {rate} %"] = {
            "weights": f"{base}/{attack_name(trig, rate)}/seed{seed}/weights.safetensors",
            "trigger": f"{RESULTS}/{wildcards.dataset}/triggers/{trig}/seed{seed}.safetensors",
        }
    return models


def fineprune_models(wildcards):
    """The backdoored model before Fine-Pruning and after it, at each pruning rate (first fine-tuning set), for
    Fine-Pruning run analysis.seed; with model_per_rate 'fresh', each rate's own model before it."""
    run, trig, rate = config["analysis"]["seed"], FP["triggers"][0], fmt_rate(FP["poison_rates"][0])
    base = f"{RESULTS}/{wildcards.dataset}/{wildcards.model}/{attack_name(trig, rate)}"
    fresh = FP.get("model_per_rate", "shared") == "fresh"
    models = {}
    for j, p in enumerate(FP["prune_rates"]):
        seed = fp_seed(run, j)
        trigger = f"{RESULTS}/{wildcards.dataset}/triggers/{trig}/seed{seed}.safetensors"
        if j == 0 or fresh:
            label = f"{trig} {rate} % before" + (f" (seed {seed})" if fresh else "")
            models[label] = {"weights": f"{base}/seed{seed}/weights.safetensors", "trigger": trigger}
        models[f"after FP {fmt_rate(p)} %"] = {
            "weights": f"{base}/seed{seed}/fineprune/{FP['finetune_data'][0]}/{fmt_rate(p)}/weights.safetensors",
            "trigger": trigger,
        }
    return models


def model_files(models):
    return sorted({f for spec in models.values() for f in spec.values() if f})


def square_triggers():
    return [t for t in TRIGGERS if config["attack"]["triggers"][t]["kind"] == "square"]


def routing_stats_triggers(wildcards):
    """Square triggers to analyse: the run's own for a square attack, every square trigger for a clean run."""
    names = square_triggers() if wildcards.attack == "clean" else [parse_attack(wildcards.attack)[0]]
    return {
        n: f"{RESULTS}/{wildcards.dataset}/triggers/{n}/seed{wildcards.seed}.safetensors" for n in names
    }


def routing_stats_targets(dataset):
    attacks = ["clean"] + [attack_name(t, r) for t in square_triggers() for r in RATES]
    return [
        f"{RESULTS}/{dataset}/{m}/{a}/seed{s}/routing_stats.json"
        for m in PMOE_MODELS
        for a in attacks
        for s in seeds_for(a)
    ]


# ----- datasets: the data file or folder of a dataset and its content digest (pmoe_backdoor.datafiles uses the
# standard library only: cheap at DAG-build time) -----


SOURCES_WITH_DATA = ("npz", "imagefolder")  # a local file or folder: an input of prepare_data, its content digested


@functools.cache
def config_layers():
    """The config as Snakemake merged it, lowest precedence first, each layer as (the folder its relative paths
    are taken from, its content): the Snakefile's configfile: files, the --configfile files in their order (each
    from its own folder), then --config (from the working directory, where Snakemake runs)."""
    cli = [Path(f).absolute() for f in workflow.config_settings.configfiles]
    directives = [Path(f).absolute() for f in workflow.configfiles]
    if workflow.config_settings.replace_workflow_config:
        directives = []
    files = [f for f in directives if f not in cli] + cli
    layers = [(f.parent, load_configfile(str(f))) for f in files]
    layers.append((Path.cwd(), workflow.config_settings.config))
    return layers


def dataset_path(name):
    """A dataset's `path`, absolute: a relative one is taken from the folder of the config layer that set it
    (the last to set it wins), or from the working directory if no layer did."""
    base = defining_layer(("datasets", name, "path"), config_layers())
    return resolve_config_path(config["datasets"][name]["path"], Path.cwd() if base is None else base)


@functools.cache
def _dataset_spec(name):
    spec = dict(config["datasets"][name])
    if spec.get("source") in SOURCES_WITH_DATA and "path" in spec:
        spec["path"] = dataset_path(name)
        # the content, not the mtime: a file replaced under its old mtime reruns prepare_data and what follows
        spec["digest"] = source_digest(spec["source"], spec["path"])
    return canonical(spec)


def dataset_spec(name):
    """The dataset's config block for prepare_data: keys sorted, `path` absolute and, for an npz file or an image
    folder, `digest`, its content's sha256 (computed once per Snakemake process; the job checks it again)."""
    return copy.deepcopy(_dataset_spec(name))


def dataset_input(name):
    """The file or folder prepare_data reads (none for a download or synthetic data)."""
    block = config["datasets"][name]
    return dataset_path(name) if block.get("source") in SOURCES_WITH_DATA and "path" in block else []


# ----- compression-activated backdoors (issue 12) -----
# An attack model lives at {dataset}/{model}/compression/{variant}-{target}/seed{seed}: the `attack` wildcard is
# "<variant>-<target label>", so the neural_cleanse job script (which names runs by that wildcard) serves it too.

COMPRESS = config["compression_attack"]
COMPRESS_RULE_KEYS = ("max_fp32_asr", "ba_tolerance")


def check_compression_attack(cfg):
    block = cfg["compression_attack"]
    if not block["enabled"]:
        return
    if cfg["models"].get(block["model"], {}).get("arch") != "pmoe":
        raise ValueError(f"config: compression_attack.model {block['model']!r} must name a pmoe model of 'models'")
    for key in ("datasets", "targets_by_dataset", "lr_drop_epoch_by_dataset", "max_fp32_asr_by_dataset"):
        for name in block.get(key, []):
            if name not in cfg["datasets"]:
                raise ValueError(f"config: compression_attack.{key} names {name!r}, which is not in 'datasets'")
    prune = block["prune"]
    if not prune.get("lower", 10) <= prune.get("rate", 20) <= prune.get("upper", 30):
        raise ValueError(f"config: compression_attack.prune needs lower <= rate <= upper, got {prune}")


check_compression_attack(config)


def compression_dir(dataset, model, attack, seed):
    return f"{RESULTS}/{dataset}/{model}/compression/{attack}/seed{seed}"


def compression_target(wildcards):
    """The target label of an attack model, from its `attack` wildcard "<variant>-<target>"."""
    return int(wildcards.attack.rsplit("-", 1)[1])


def compression_train_params(wildcards):
    """The attack recipe of one model: the train block, its variant, the pruning keys, the dataset's lr drop."""
    variant = wildcards.attack.rsplit("-", 1)[0]
    prune = COMPRESS["prune"]
    cfg = dict(COMPRESS["train"], variant=variant)
    cfg.update({k: v for k, v in (("prune_rate", prune.get("rate")), ("prune_lower", prune.get("lower")),
                                  ("prune_upper", prune.get("upper")), ("alpha", prune.get("alpha"))) if v is not None})
    by_dataset = COMPRESS.get("lr_drop_epoch_by_dataset", {})
    if wildcards.dataset in by_dataset:
        cfg["lr_drop_epoch"] = by_dataset[wildcards.dataset]
    return canonical(cfg)


def compression_max_fp32_asr(wildcards):
    return COMPRESS.get("max_fp32_asr_by_dataset", {}).get(wildcards.dataset, COMPRESS["max_fp32_asr"])


def compression_runs(dataset):
    """(model, attack wildcard, seed) of every attack model of a dataset."""
    if not COMPRESS["enabled"] or dataset not in COMPRESS["datasets"]:
        return []
    targets = COMPRESS.get("targets_by_dataset", {}).get(dataset, COMPRESS["targets"])
    return [
        (COMPRESS["model"], f"{v}-{t}", s) for v in COMPRESS["variants"] for t in targets for s in range(COMPRESS["seeds"])
    ]


def compression_eval_targets(dataset):
    return [f"{compression_dir(dataset, m, a, s)}/evaluation.json" for m, a, s in compression_runs(dataset)]


def compression_nc_targets(dataset):
    """Neural Cleanse on each released (fp32) attack model, when the neural_cleanse block is enabled."""
    if not NC["enabled"]:
        return []
    return [f"{compression_dir(dataset, m, a, s)}/neural_cleanse/fp32.json" for m, a, s in compression_runs(dataset)]


def compression_clean_nc(dataset):
    """The clean models' fp32 Neural Cleanse summaries (the negatives of the ROC-AUC), when the study has them:
    those of the detection table and, when the blindspot table runs Neural Cleanse at fp32, its clean seeds too."""
    if not NC["enabled"] or "fp32" not in NC["precisions"]:
        return []
    runs = {run for run, attack, _ in nc_runs(dataset) if attack == "clean"}
    if "fp32" in BLIND.get("precisions", []):
        runs |= {run for run, attack in blindspot_runs(dataset) if attack == "clean"}
    return [f"{run}/neural_cleanse/fp32.json" for run in sorted(runs)]


def compression_targets():
    if not COMPRESS["enabled"]:
        return []
    return [f"{RESULTS}/tables/compression_{d}.{ext}" for d in COMPRESS["datasets"] for ext in ("csv", "md", "tex")]


# ----- the quantization-blindspot table (issue 13) -----

BLIND = config["blindspot"]


def check_blindspot(cfg):
    block = cfg["blindspot"]
    if not block["enabled"]:
        return
    check_rates(cfg, block["rates"], "blindspot.rates")
    for trig in block.get("triggers", []):
        if trig not in cfg["attack"]["triggers"]:
            raise ValueError(f"config: blindspot.triggers names {trig!r}, not in attack.triggers")
    missing = [p for p in block["precisions"] if p not in cfg["deployment"]["precisions"]]
    if missing:
        raise ValueError(f"config: blindspot.precisions {missing} are not in deployment.precisions (the table takes "
                         "ASR and BA at each precision from the deployed models)")
    strip = cfg["strip"]
    if strip["holdout"] < 1 / strip["frr"]:
        raise ValueError(f"config: strip.holdout ({strip['holdout']}) is too small for strip.frr {strip['frr']}: "
                         f"at least 1 / frr = {1 / strip['frr']:g} held-out images are needed to set the threshold")


check_blindspot(config)


def nc_optimizer():
    """Neural Cleanse's optimizer keys and, only when it is not the default 'fast', its schedule: results of the
    fast schedule keep the parameters they were made with (and are not rerun)."""
    schedule = NC.get("schedule", "fast")
    return canonical({**NC.get("optimizer", {}), **({"schedule": schedule} if schedule != "fast" else {})})


def blindspot_triggers():
    return BLIND.get("triggers") or TRIGGERS


def blindspot_runs(dataset):
    """(run directory, attack) of every model the three data and input defenses examine."""
    if not BLIND["enabled"]:
        return []
    attacks = ["clean"] + [attack_name(t, r) for t in blindspot_triggers() for r in BLIND["rates"]]
    return [
        (f"{RESULTS}/{dataset}/{m}/{a}/seed{s}", a)
        for m in MODELS
        for a in attacks
        for s in seeds_for(a)[: BLIND["seeds"]]
    ]


def blindspot_defense_targets(dataset):
    return [
        f"{run}/{defense}/{p}.json"
        for run, _ in blindspot_runs(dataset)
        for defense in ("strip", "activation_clustering", "spectral_signatures")
        for p in BLIND["precisions"]
    ]


def strip_triggers(wildcards):
    """The run's own trigger; for a clean model every analysed trigger of its seed (its false positives)."""
    names = blindspot_triggers() if wildcards.attack == "clean" else [parse_attack(wildcards.attack)[0]]
    return {n: f"{RESULTS}/{wildcards.dataset}/triggers/{n}/seed{wildcards.seed}.safetensors" for n in names}


def blindspot_nc_targets(dataset):
    """Neural Cleanse on the same models as the other defenses (every blindspot seed, not only the
    neural_cleanse.seeds of the detection table), at the precisions both blocks name."""
    if not NC["enabled"]:
        return []
    precisions = [p for p in NC["precisions"] if p in BLIND["precisions"]]
    return [f"{run}/neural_cleanse/{p}.json" for run, _ in blindspot_runs(dataset) for p in precisions]


def blindspot_inputs(dataset):
    """Every defense summary of the table (Neural Cleanse's included), the deployed runs' ASR/BA, and the
    Fine-Pruned models as deployed."""
    runs = {run for run, _ in blindspot_runs(dataset)}
    return {
        "defenses": blindspot_defense_targets(dataset) + blindspot_nc_targets(dataset),
        "deployed": [f"{run}/deployed.json" for run in sorted(runs)] if DEPLOY["precisions"] else [],
        "fine_pruned": [t for t in deploy_targets(dataset) if "/fineprune/" in t],
    }


def blindspot_targets():
    if not BLIND["enabled"]:
        return []
    return [f"{RESULTS}/tables/blindspot_{d}.{ext}" for d in DATASETS for ext in ("csv", "md", "tex")] + [
        f"{RESULTS}/figures/blindspot_{d}.png" for d in DATASETS
    ]
