# Issue 12: backdoors that appear only after compression (Tian et al., "Stealthy Backdoors as Compression
# Artifacts"). Each attack model is trained from scratch, measured as released and as the victim compresses it
# (int8 two ways, int4, Fine-Pruning), checked by Neural Cleanse as released, and summarised in one table per dataset.
# The rules exist whatever the config (compression_attack.enabled decides whether any job is wanted), hence .get.


rule train_compression_attack:
    """One attack model (variant and target from the `attack` wildcard "<variant>-<target>"), the epoch the
    authors' rule picks, its history and the square trigger it was trained with."""
    input:
        data=f"{RESULTS}/data/{{dataset}}.npz",
    output:
        weights=f"{RESULTS}/{{dataset}}/{{model}}/compression/{{attack}}/seed{{seed}}/weights.safetensors",
        history=f"{RESULTS}/{{dataset}}/{{model}}/compression/{{attack}}/seed{{seed}}/history.json",
        trigger=f"{RESULTS}/{{dataset}}/{{model}}/compression/{{attack}}/seed{{seed}}/trigger.safetensors",
    params:
        model=lambda wc: canonical(config["models"][wc.model]),
        attack=compression_train_params,
        trigger=canonical(COMPRESS.get("trigger", {})),
        target=compression_target,
        calibration=DEPLOY["calibration_images"],
        max_fp32_asr=compression_max_fp32_asr,
        ba_tolerance=COMPRESS.get("ba_tolerance"),
        device=config["device"],
        jobs_per_gpu=config["resources"]["jobs_per_gpu"],
    log:
        f"{RESULTS}/logs/train_compression_attack/{{dataset}}/{{model}}/{{attack}}/seed{{seed}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/train_compression_attack/{{dataset}}/{{model}}/{{attack}}/seed{{seed}}.tsv"
    threads: config["resources"]["train_threads"]
    resources:
        gpu=1,
        runtime=config["resources"]["train_runtime_min"],
        mem_mb=config["resources"]["train_mem_mb"],
    conda:
        "../envs/pmoe.yaml"
    script:
        "../workflow/scripts/compression/train_compression_attack.py"


rule evaluate_compression_attack:
    """BA / ASR of one attack model at fp32, int8 (faithful and matched), int4 and after Fine-Pruning with and
    without fine-tuning; routing flips between fp32 and int8 on triggered images."""
    input:
        data=f"{RESULTS}/data/{{dataset}}.npz",
        weights=f"{RESULTS}/{{dataset}}/{{model}}/compression/{{attack}}/seed{{seed}}/weights.safetensors",
        history=f"{RESULTS}/{{dataset}}/{{model}}/compression/{{attack}}/seed{{seed}}/history.json",
        trigger=f"{RESULTS}/{{dataset}}/{{model}}/compression/{{attack}}/seed{{seed}}/trigger.safetensors",
    output:
        f"{RESULTS}/{{dataset}}/{{model}}/compression/{{attack}}/seed{{seed}}/evaluation.json",
    params:
        target=compression_target,
        calibration=DEPLOY["calibration_images"],
        fine_pruning=canonical(COMPRESS.get("fine_pruning", {})),
        finetune=TRAIN,
        batch_size=config["evaluation"]["batch_size"],
        device=config["device"],
        jobs_per_gpu=config["resources"]["jobs_per_gpu"],
    log:
        f"{RESULTS}/logs/evaluate_compression_attack/{{dataset}}/{{model}}/{{attack}}/seed{{seed}}.log",
    threads: config["resources"]["train_threads"]
    resources:
        gpu=1,
        runtime=config["resources"]["train_runtime_min"],
        mem_mb=config["resources"]["train_mem_mb"],
    conda:
        "../envs/pmoe.yaml"
    script:
        "../workflow/scripts/compression/evaluate_compression_attack.py"


use rule neural_cleanse as compression_neural_cleanse with:
    input:
        data=f"{RESULTS}/data/{{dataset}}.npz",
        weights=f"{RESULTS}/{{dataset}}/{{model}}/compression/{{attack}}/seed{{seed}}/weights.safetensors",
    output:
        summary=f"{RESULTS}/{{dataset}}/{{model}}/compression/{{attack}}/seed{{seed}}/neural_cleanse/{{precision}}.json",
        masks=f"{RESULTS}/{{dataset}}/{{model}}/compression/{{attack}}/seed{{seed}}/neural_cleanse/{{precision}}.safetensors",
    params:
        optimizer=canonical(NC.get("optimizer", {})),
        classes=NC.get("classes"),
        images=NC.get("images"),
        calibration=DEPLOY["calibration_images"],
        target=compression_target,
        device=config["device"],
        jobs_per_gpu=config["resources"]["jobs_per_gpu"],
    log:
        f"{RESULTS}/logs/compression_neural_cleanse/{{dataset}}/{{model}}/{{attack}}/seed{{seed}}/{{precision}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/compression_neural_cleanse/{{dataset}}/{{model}}/{{attack}}/seed{{seed}}/{{precision}}.tsv"


rule compression_attack_table:
    """The "compression-activated backdoors" table of one dataset."""
    input:
        evaluations=lambda wc: compression_eval_targets(wc.dataset),
        nc=lambda wc: compression_nc_targets(wc.dataset),
        clean_nc=lambda wc: compression_clean_nc(wc.dataset),
    output:
        csv=f"{RESULTS}/tables/compression_{{dataset}}.csv",
        md=f"{RESULTS}/tables/compression_{{dataset}}.md",
        tex=f"{RESULTS}/tables/compression_{{dataset}}.tex",
        html=report(
            f"{RESULTS}/tables/compression_{{dataset}}.html",
            caption="../reports/compression_table.rst",
            category="Compression-activated backdoors",
            subcategory="{dataset}",
        ),
    log:
        f"{RESULTS}/logs/compression_attack_table/{{dataset}}.log",
    conda:
        "../envs/pmoe.yaml"
    script:
        "../workflow/scripts/compression/compression_attack_table.py"
