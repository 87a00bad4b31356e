rule evaluate:
    """BA on the full clean test set, ASR on every non-target test image with the trigger, per-class accuracy."""
    input:
        data=f"{RESULTS}/data/{{dataset}}.npz",
        weights=f"{RESULTS}/{{dataset}}/{{model}}/{{attack}}/seed{{seed}}/weights.safetensors",
        trigger=plan.trigger_file,
    output:
        f"{RESULTS}/{{dataset}}/{{model}}/{{attack}}/seed{{seed}}/metrics.json",
    params:
        target=TARGET,
        device=DEVICE,
        jobs_per_gpu=JOBS_PER_GPU,
        batch_size=config["evaluation"]["batch_size"],
    log:
        f"{RESULTS}/logs/evaluate/{{dataset}}/{{model}}/{{attack}}/seed{{seed}}.log",
    threads: THREADS
    resources:
        **GPU_JOB,
    conda:
        "../envs/pmoe.yaml"
    script:
        "../workflow/scripts/evaluate/evaluate.py"
