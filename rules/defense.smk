rule fine_prune:
    """Fine-Pruning of one backdoored pmoe at one pruning rate with one fine-tuning set (variant 'authors' or
    'clean'): CA and ASR before, after pruning, after fine-tuning; the fine-tuned weights."""
    input:
        data=f"{RESULTS}/data/{{dataset}}.npz",
        weights=f"{RESULTS}/{{dataset}}/{{model}}/{{attack}}/seed{{seed}}/weights.safetensors",
        poison=poison_file,
        trigger=trigger_file,
    output:
        metrics=f"{RESULTS}/{{dataset}}/{{model}}/{{attack}}/seed{{seed}}/fineprune/{{variant}}/{{prune}}/metrics.json",
        weights=f"{RESULTS}/{{dataset}}/{{model}}/{{attack}}/seed{{seed}}/fineprune/{{variant}}/{{prune}}/weights.safetensors",
    params:
        fine_pruning=canonical({k: FP[k] for k in FP_JOB_KEYS}),
        train=TRAIN,
        target=config["attack"]["target"],
        device=config["device"],
        jobs_per_gpu=config["resources"]["jobs_per_gpu"],
    log:
        f"{RESULTS}/logs/fine_prune/{{dataset}}/{{model}}/{{attack}}/seed{{seed}}/{{variant}}/{{prune}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/fine_prune/{{dataset}}/{{model}}/{{attack}}/seed{{seed}}/{{variant}}/{{prune}}.tsv"
    threads: config["resources"]["train_threads"]
    resources:
        gpu=1,
        runtime=config["resources"]["train_runtime_min"],
        mem_mb=config["resources"]["train_mem_mb"],
    conda:
        "../envs/pmoe.yaml"
    script:
        "../workflow/scripts/defense/fine_prune.py"


rule prune_sweep:
    """CA and ASR after pruning alone (no fine-tuning) over a range of pruning rates."""
    input:
        data=f"{RESULTS}/data/{{dataset}}.npz",
        weights=f"{RESULTS}/{{dataset}}/{{model}}/{{attack}}/seed{{seed}}/weights.safetensors",
        poison=poison_file,
        trigger=trigger_file,
    output:
        f"{RESULTS}/{{dataset}}/{{model}}/{{attack}}/seed{{seed}}/prune_sweep.json",
    params:
        rates=FP["sweep"],
        activation_images=FP["activation_images"],
        activation_data=FP["finetune_data"][0],
        target=config["attack"]["target"],
        device=config["device"],
    log:
        f"{RESULTS}/logs/prune_sweep/{{dataset}}/{{model}}/{{attack}}/seed{{seed}}.log",
    threads: config["resources"]["train_threads"]
    resources:
        runtime=30,
    conda:
        "../envs/pmoe.yaml"
    script:
        "../workflow/scripts/defense/prune_sweep.py"
