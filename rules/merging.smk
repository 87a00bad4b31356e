# Issue 11: merging defenses. Victims are fine-tuned copies of one clean ancestor (the study's clean run of a seed);
# each set of victims is merged by weight averaging (WAG) and by module switching (MSD), the defender picks an MSD
# candidate with a clean held-out set, and every model is measured on the rest of the test set. The rules exist
# whatever the config (merging.enabled decides whether any job is wanted), hence .get for the block's keys.


rule finetune_victim:
    """A copy of the clean ancestor fine-tuned on one victim's data (a trigger at merging.rate, or clean data)."""
    input:
        data=f"{RESULTS}/data/{{dataset}}.npz",
        ancestor=f"{RESULTS}/{{dataset}}/{{model}}/clean/seed{{seed}}/weights.safetensors",
        poison=victim_poison,
    output:
        weights=f"{RESULTS}/{{dataset}}/{{model}}/merging/victims/{{victim}}/r{{replica}}/seed{{seed}}/weights.safetensors",
        history=f"{RESULTS}/{{dataset}}/{{model}}/merging/victims/{{victim}}/r{{replica}}/seed{{seed}}/history.json",
    params:
        seed=lambda wc: int(wc.seed) + REPLICA_SEED_STEP * int(wc.replica),
        finetune=canonical({k: v for k, v in MERGE.get("finetune", {}).items() if k != "pack"}),
        device=config["device"],
        jobs_per_gpu=config["resources"]["jobs_per_gpu"],
    log:
        f"{RESULTS}/logs/finetune_victim/{{dataset}}/{{model}}/{{victim}}/r{{replica}}/seed{{seed}}.log",
    threads: config["resources"]["train_threads"]
    resources:
        gpu=1,
        runtime=config["resources"]["train_runtime_min"],
        mem_mb=config["resources"]["train_mem_mb"],
    conda:
        "../envs/pmoe.yaml"
    script:
        "../workflow/scripts/merging/finetune_victim.py"


rule msd_strategy:
    """The MSD strategy for n models of the pmoe architecture (it depends on nothing else: computed once)."""
    output:
        f"{RESULTS}/merging/strategies/n{{n}}_{{coupling}}.json",
    params:
        weights=canonical(MERGE.get("weights", {})),
        evolution=canonical(MERGE.get("evolution", {})),
    log:
        f"{RESULTS}/logs/msd_strategy/n{{n}}_{{coupling}}.log",
    conda:
        "../envs/pmoe.yaml"
    script:
        "../workflow/scripts/merging/msd_strategy.py"


rule merge_models:
    """WAG and every MSD candidate of one victim set, seed and router/expert coupling."""
    input:
        victims=set_victim_weights,
        strategy=lambda wc: strategy_file(len(MERGE["sets"][wc.set]), wc.coupling),
    output:
        directory(f"{RESULTS}/{{dataset}}/{{model}}/merging/{{set}}/seed{{seed}}/{{coupling}}/merged"),
    params:
        roles=MERGE.get("roles"),
    log:
        f"{RESULTS}/logs/merge_models/{{dataset}}/{{model}}/{{set}}/seed{{seed}}/{{coupling}}.log",
    conda:
        "../envs/pmoe.yaml"
    script:
        "../workflow/scripts/merging/merge_models.py"


rule select_candidate:
    """The defender's choice of candidate (suspect class from a held-out clean set), and BA / ASR of the victims,
    WAG, every candidate and the chosen one on the rest of the test set."""
    input:
        data=f"{RESULTS}/data/{{dataset}}.npz",
        victims=set_victim_weights,
        triggers=lambda wc: list(set_triggers(wc).values()),
        merged=f"{RESULTS}/{{dataset}}/{{model}}/merging/{{set}}/seed{{seed}}/{{coupling}}/merged",
    output:
        f"{RESULTS}/{{dataset}}/{{model}}/merging/{{set}}/seed{{seed}}/{{coupling}}/selection.json",
    params:
        labels=lambda wc: [label for label, _, _ in set_victims(wc.set)],
        triggers=set_triggers,
        holdout_per_class=MERGE.get("holdout_per_class"),
        holdout_seed=MERGE.get("holdout_seed"),
        inversion=canonical(MERGE.get("inversion", {})),
        target=config["attack"]["target"],
        batch_size=config["evaluation"]["batch_size"],
        device=config["device"],
        jobs_per_gpu=config["resources"]["jobs_per_gpu"],
    log:
        f"{RESULTS}/logs/select_candidate/{{dataset}}/{{model}}/{{set}}/seed{{seed}}/{{coupling}}.log",
    threads: config["resources"]["train_threads"]
    resources:
        gpu=1,
        runtime=config["resources"]["train_runtime_min"],
    conda:
        "../envs/pmoe.yaml"
    script:
        "../workflow/scripts/merging/select_candidate.py"


rule defend_merged:
    """WAG and the selected MSD candidate at each deployment precision and after Fine-Pruning (channels ranked and
    the model fine-tuned on the defender's held-out clean set only); BA / ASR on select_candidate's test images."""
    input:
        data=f"{RESULTS}/data/{{dataset}}.npz",
        triggers=lambda wc: list(set_triggers(wc).values()),
        merged=f"{RESULTS}/{{dataset}}/{{model}}/merging/{{set}}/seed{{seed}}/{{coupling}}/merged",
        selection=f"{RESULTS}/{{dataset}}/{{model}}/merging/{{set}}/seed{{seed}}/{{coupling}}/selection.json",
    output:
        f"{RESULTS}/{{dataset}}/{{model}}/merging/{{set}}/seed{{seed}}/{{coupling}}/merged_defense.json",
    params:
        triggers=set_triggers,
        holdout_per_class=MERGE.get("holdout_per_class"),
        holdout_seed=MERGE.get("holdout_seed"),
        # fp32 alone when no deployment precision is configured: the reference the Fine-Pruning rows compare with
        precisions=DEPLOY["precisions"] or ["fp32"],
        calibration=DEPLOY["calibration_images"],
        prune_rates=FP["prune_rates"] if FP["enabled"] else [],
        fine_pruning=canonical({k: FP[k] for k in ("epochs", "lr", "mask")}) if FP["enabled"] else {},
        train=TRAIN,
        target=config["attack"]["target"],
        batch_size=config["evaluation"]["batch_size"],
        device=config["device"],
        jobs_per_gpu=config["resources"]["jobs_per_gpu"],
    log:
        f"{RESULTS}/logs/defend_merged/{{dataset}}/{{model}}/{{set}}/seed{{seed}}/{{coupling}}.log",
    threads: config["resources"]["train_threads"]
    resources:
        gpu=1,
        runtime=config["resources"]["train_runtime_min"],
    conda:
        "../envs/pmoe.yaml"
    script:
        "../workflow/scripts/merging/defend_merged.py"


rule merging_table:
    """Victims, WAG and MSD (oracle and selected) per victim set and coupling: clean accuracy and ASR."""
    input:
        lambda wc: merging_results(wc.dataset),
    output:
        csv=f"{RESULTS}/tables/merging_{{dataset}}.csv",
        md=f"{RESULTS}/tables/merging_{{dataset}}.md",
        tex=f"{RESULTS}/tables/merging_{{dataset}}.tex",
        html=report(
            f"{RESULTS}/tables/merging_{{dataset}}.html",
            caption="../reports/merging_table.rst",
            category="Merging defenses",
            subcategory="{dataset}",
        ),
    params:
        target=config["attack"]["target"],
    log:
        f"{RESULTS}/logs/merging_table/{{dataset}}.log",
    conda:
        "../envs/pmoe.yaml"
    script:
        "../workflow/scripts/merging/merging_table.py"


rule merged_defense_table:
    """WAG and the selected MSD candidate per victim set and coupling: CACC and ASR at each deployment precision and
    after Fine-Pruning."""
    input:
        lambda wc: merging_results(wc.dataset, "merged_defense.json", defended_sets()),
    output:
        csv=f"{RESULTS}/tables/merged_defense_{{dataset}}.csv",
        md=f"{RESULTS}/tables/merged_defense_{{dataset}}.md",
        tex=f"{RESULTS}/tables/merged_defense_{{dataset}}.tex",
        html=report(
            f"{RESULTS}/tables/merged_defense_{{dataset}}.html",
            caption="../reports/merged_defense_table.rst",
            category="Merging defenses",
            subcategory="{dataset}",
        ),
    log:
        f"{RESULTS}/logs/merged_defense_table/{{dataset}}.log",
    conda:
        "../envs/pmoe.yaml"
    script:
        "../workflow/scripts/merging/merged_defense_table.py"


rule msd_strategy_figure:
    """The MSD strategies used: each module slot coloured by the model it is taken from."""
    input:
        [strategy_file(n, c) for n, c in merging_strategies()],
    output:
        report(
            f"{RESULTS}/figures/msd_strategies.png",
            caption="../reports/msd_strategies.rst",
            category="Merging defenses",
        ),
    params:
        labels=[f"{n} models, {c}" for n, c in merging_strategies()],
    log:
        f"{RESULTS}/logs/msd_strategy_figure.log",
    conda:
        "../envs/pmoe.yaml"
    script:
        "../workflow/scripts/merging/msd_strategy_figure.py"
