rule train_model:
    """Train one model: one (dataset, model, attack, seed); attack is 'clean' or '{trigger}-{rate}'."""
    input:
        data=f"{RESULTS}/data/{{dataset}}.npz",
        poison=poison_file,
        trigger=trigger_file,
    output:
        weights=f"{RESULTS}/{{dataset}}/{{model}}/{{attack}}/seed{{seed}}/weights.safetensors",
        history=f"{RESULTS}/{{dataset}}/{{model}}/{{attack}}/seed{{seed}}/history.json",
    params:
        model=lambda wc: canonical(config["models"][wc.model]),
        train=canonical(config["train"]),
        device=config["device"],
        jobs_per_gpu=config["resources"]["jobs_per_gpu"],
        probes=config["routing_probes"],
    log:
        f"{RESULTS}/logs/train_model/{{dataset}}/{{model}}/{{attack}}/seed{{seed}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/train_model/{{dataset}}/{{model}}/{{attack}}/seed{{seed}}.tsv"
    threads: config["resources"]["train_threads"]
    resources:
        gpu=1,
        runtime=config["resources"]["train_runtime_min"],
        mem_mb=config["resources"]["train_mem_mb"],
    conda:
        "../envs/pmoe.yaml"
    script:
        "../workflow/scripts/train/train_model.py"
