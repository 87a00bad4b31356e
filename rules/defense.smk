rule fine_prune:
    """Fine-Pruning of one backdoored pmoe at one pruning rate with one fine-tuning set (variant 'authors' or
    'clean'): CA and ASR before, after pruning, after fine-tuning; the fine-tuned weights."""
    input:
        data=f"{RESULTS}/data/{{dataset}}.npz",
        weights=f"{RESULTS}/{{dataset}}/{{model}}/{{attack}}/seed{{seed}}/weights.safetensors",
        poison=plan.poison_file,
        trigger=plan.trigger_file,
    output:
        metrics=f"{RESULTS}/{{dataset}}/{{model}}/{{attack}}/seed{{seed}}/fineprune/{{variant}}/{{prune}}/metrics.json",
        weights=f"{RESULTS}/{{dataset}}/{{model}}/{{attack}}/seed{{seed}}/fineprune/{{variant}}/{{prune}}/weights.safetensors",
    params:
        fine_pruning=plan.fine_prune_params(),
        train=plan.finetune_recipe(),
        target=TARGET,
        device=DEVICE,
        jobs_per_gpu=JOBS_PER_GPU,
    log:
        f"{RESULTS}/logs/fine_prune/{{dataset}}/{{model}}/{{attack}}/seed{{seed}}/{{variant}}/{{prune}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/fine_prune/{{dataset}}/{{model}}/{{attack}}/seed{{seed}}/{{variant}}/{{prune}}.tsv"
    threads: THREADS
    resources:
        **GPU_JOB,
    conda:
        "../envs/pmoe.yaml"
    script:
        "../workflow/scripts/defense/fine_prune.py"


rule prune_sweep:
    """CA and ASR after pruning alone (no fine-tuning) over a range of pruning rates."""
    input:
        data=f"{RESULTS}/data/{{dataset}}.npz",
        weights=f"{RESULTS}/{{dataset}}/{{model}}/{{attack}}/seed{{seed}}/weights.safetensors",
        poison=plan.poison_file,
        trigger=plan.trigger_file,
    output:
        f"{RESULTS}/{{dataset}}/{{model}}/{{attack}}/seed{{seed}}/prune_sweep.json",
    params:
        rates=plan.fp.get("sweep"),
        activation_images=plan.fp.get("activation_images"),
        activation_data=plan.fp.get("finetune_data", [None])[0],
        target=TARGET,
        device=DEVICE,
        jobs_per_gpu=JOBS_PER_GPU,
    log:
        f"{RESULTS}/logs/prune_sweep/{{dataset}}/{{model}}/{{attack}}/seed{{seed}}.log",
    threads: THREADS
    resources:
        **GPU_JOB,
    conda:
        "../envs/pmoe.yaml"
    script:
        "../workflow/scripts/defense/prune_sweep.py"


rule defend:
    """One registered defense (pmoe_backdoor.defenses) on one model as deployed at one precision: its summary and
    its artifacts (Neural Cleanse's reversed masks; an empty file for the others)."""
    input:
        data=f"{RESULTS}/data/{{dataset}}.npz",
        weights=f"{RESULTS}/{{dataset}}/{{model}}/{{attack}}/seed{{seed}}/weights.safetensors",
        poison=plan.poison_file,
        triggers=lambda wc: list(plan.defense_triggers(wc).values()),
    output:
        summary=f"{RESULTS}/{{dataset}}/{{model}}/{{attack}}/seed{{seed}}/{{defense}}/{{precision}}.json",
        artifacts=f"{RESULTS}/{{dataset}}/{{model}}/{{attack}}/seed{{seed}}/{{defense}}/{{precision}}.safetensors",
    params:
        defense=lambda wc: wc.defense,
        config=lambda wc: plan.defense_config(wc.defense),
        triggers=plan.defense_triggers,
        calibration=DEPLOY["calibration_images"],
        target=TARGET,
        device=DEVICE,
        jobs_per_gpu=JOBS_PER_GPU,
    log:
        f"{RESULTS}/logs/defend/{{defense}}/{{dataset}}/{{model}}/{{attack}}/seed{{seed}}/{{precision}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/defend/{{defense}}/{{dataset}}/{{model}}/{{attack}}/seed{{seed}}/{{precision}}.tsv"
    threads: THREADS
    resources:
        **GPU_JOB,
    conda:
        "../envs/pmoe.yaml"
    script:
        "../workflow/scripts/defense/defend.py"
