# Merging defenses (Li et al., module switching). Victims are fine-tuned copies of one clean ancestor (the study's
# clean run of a seed); each set of victims is merged by weight averaging (WAG) and by module switching (MSD), the
# defender picks an MSD candidate with a clean held-out set, and every model is measured on the rest of the test set.
# The rules exist whatever the config (merging.enabled decides whether any job is wanted), hence .get for its keys.


rule finetune_victim:
    """A copy of the clean ancestor fine-tuned on one victim's data (a trigger at merging.rate, or clean data)."""
    input:
        data=f"{RESULTS}/data/{{dataset}}.npz",
        ancestor=f"{RESULTS}/{{dataset}}/{{model}}/clean/seed{{seed}}/weights.safetensors",
        poison=plan.victim_poison,
    output:
        weights=f"{RESULTS}/{{dataset}}/{{model}}/merging/victims/{{victim}}/r{{replica}}/seed{{seed}}/weights.safetensors",
        history=f"{RESULTS}/{{dataset}}/{{model}}/merging/victims/{{victim}}/r{{replica}}/seed{{seed}}/history.json",
    params:
        seed=plan.victim_seed,
        finetune=plan.victim_finetune(),
        device=DEVICE,
        jobs_per_gpu=JOBS_PER_GPU,
    log:
        f"{RESULTS}/logs/finetune_victim/{{dataset}}/{{model}}/{{victim}}/r{{replica}}/seed{{seed}}.log",
    threads: THREADS
    resources:
        **GPU_JOB,
    conda:
        "../envs/pmoe.yaml"
    script:
        "../workflow/scripts/merging/finetune_victim.py"


rule msd_strategy:
    """The MSD strategy for n models of one architecture (it depends on nothing else: computed once)."""
    output:
        f"{RESULTS}/merging/strategies/{{arch}}/n{{n}}_{{coupling}}.json",
    wildcard_constraints:
        arch=r"[A-Za-z0-9_]+",
    params:
        weights=canonical(plan.merge.get("weights", {})),
        evolution=canonical(plan.merge.get("evolution", {})),
    log:
        f"{RESULTS}/logs/msd_strategy/{{arch}}/n{{n}}_{{coupling}}.log",
    conda:
        "../envs/pmoe.yaml"
    script:
        "../workflow/scripts/merging/msd_strategy.py"


rule merge_models:
    """WAG and every MSD candidate of one victim set, seed and router/expert coupling."""
    input:
        victims=plan.set_victim_weights,
        strategy=plan.set_strategy,
    output:
        directory(f"{RESULTS}/{{dataset}}/{{model}}/merging/{{set}}/seed{{seed}}/{{coupling}}/merged"),
    params:
        roles=plan.merge.get("roles"),
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
        victims=plan.set_victim_weights,
        triggers=lambda wc: list(plan.set_triggers(wc).values()),
        merged=f"{RESULTS}/{{dataset}}/{{model}}/merging/{{set}}/seed{{seed}}/{{coupling}}/merged",
    output:
        f"{RESULTS}/{{dataset}}/{{model}}/merging/{{set}}/seed{{seed}}/{{coupling}}/selection.json",
    params:
        labels=lambda wc: [label for label, _, _ in plan.set_victims(wc.set)],
        triggers=plan.set_triggers,
        holdout_per_class=plan.merge.get("holdout_per_class"),
        holdout_seed=plan.merge.get("holdout_seed"),
        inversion=canonical(plan.merge.get("inversion", {})),
        target=TARGET,
        batch_size=config["evaluation"]["batch_size"],
        device=DEVICE,
        jobs_per_gpu=JOBS_PER_GPU,
    log:
        f"{RESULTS}/logs/select_candidate/{{dataset}}/{{model}}/{{set}}/seed{{seed}}/{{coupling}}.log",
    threads: THREADS
    resources:
        **GPU_JOB,
    conda:
        "../envs/pmoe.yaml"
    script:
        "../workflow/scripts/merging/select_candidate.py"


rule defend_merged:
    """WAG and the selected MSD candidate at each deployment precision and after Fine-Pruning (channels ranked and
    the model fine-tuned on the defender's held-out clean set only); BA / ASR on select_candidate's test images."""
    input:
        data=f"{RESULTS}/data/{{dataset}}.npz",
        triggers=lambda wc: list(plan.set_triggers(wc).values()),
        merged=f"{RESULTS}/{{dataset}}/{{model}}/merging/{{set}}/seed{{seed}}/{{coupling}}/merged",
        selection=f"{RESULTS}/{{dataset}}/{{model}}/merging/{{set}}/seed{{seed}}/{{coupling}}/selection.json",
    output:
        f"{RESULTS}/{{dataset}}/{{model}}/merging/{{set}}/seed{{seed}}/{{coupling}}/merged_defense.json",
    params:
        triggers=plan.set_triggers,
        holdout_per_class=plan.merge.get("holdout_per_class"),
        holdout_seed=plan.merge.get("holdout_seed"),
        calibration=DEPLOY["calibration_images"],
        **plan.defend_merged_params(),
        target=TARGET,
        batch_size=config["evaluation"]["batch_size"],
        device=DEVICE,
        jobs_per_gpu=JOBS_PER_GPU,
    log:
        f"{RESULTS}/logs/defend_merged/{{dataset}}/{{model}}/{{set}}/seed{{seed}}/{{coupling}}.log",
    threads: THREADS
    resources:
        **GPU_JOB,
    conda:
        "../envs/pmoe.yaml"
    script:
        "../workflow/scripts/merging/defend_merged.py"


rule merging_table:
    """Victims, WAG and MSD (oracle and selected) per victim set and coupling: clean accuracy and ASR."""
    input:
        lambda wc: plan.merging_results(wc.dataset),
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
        target=TARGET,
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
        lambda wc: plan.merging_results(wc.dataset, "merged_defense.json", plan.defended_sets()),
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
        [plan.strategy_file(n, c) for n, c in plan.merging_strategies()],
    output:
        report(
            f"{RESULTS}/figures/msd_strategies.png",
            caption="../reports/msd_strategies.rst",
            category="Merging defenses",
        ),
    params:
        labels=[f"{n} models, {c}" for n, c in plan.merging_strategies()],
    log:
        f"{RESULTS}/logs/msd_strategy_figure.log",
    conda:
        "../envs/pmoe.yaml"
    script:
        "../workflow/scripts/merging/msd_strategy_figure.py"
