# Backdoors that appear only after compression (Tian et al., "Stealthy Backdoors as Compression
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
        model=lambda wc: plan.model_spec(wc.model),
        attack=plan.compression_train_params,
        trigger=canonical(plan.compress.get("trigger", {})),
        target=plan.compression_target,
        calibration=DEPLOY["calibration_images"],
        max_fp32_asr=plan.compression_max_fp32_asr,
        ba_tolerance=plan.compress.get("ba_tolerance"),
        device=DEVICE,
        jobs_per_gpu=JOBS_PER_GPU,
    log:
        f"{RESULTS}/logs/train_compression_attack/{{dataset}}/{{model}}/{{attack}}/seed{{seed}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/train_compression_attack/{{dataset}}/{{model}}/{{attack}}/seed{{seed}}.tsv"
    threads: THREADS
    resources:
        **GPU_JOB,
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
        target=plan.compression_target,
        calibration=DEPLOY["calibration_images"],
        fine_pruning=canonical(plan.compress.get("fine_pruning", {})),
        finetune=plan.finetune_recipe(quiet=True),
        batch_size=config["evaluation"]["batch_size"],
        device=DEVICE,
        jobs_per_gpu=JOBS_PER_GPU,
    log:
        f"{RESULTS}/logs/evaluate_compression_attack/{{dataset}}/{{model}}/{{attack}}/seed{{seed}}.log",
    threads: THREADS
    resources:
        **GPU_JOB,
    conda:
        "../envs/pmoe.yaml"
    script:
        "../workflow/scripts/compression/evaluate_compression_attack.py"


use rule defend as compression_neural_cleanse with:
    input:
        data=f"{RESULTS}/data/{{dataset}}.npz",
        weights=f"{RESULTS}/{{dataset}}/{{model}}/compression/{{attack}}/seed{{seed}}/weights.safetensors",
    output:
        summary=f"{RESULTS}/{{dataset}}/{{model}}/compression/{{attack}}/seed{{seed}}/neural_cleanse/{{precision}}.json",
        artifacts=f"{RESULTS}/{{dataset}}/{{model}}/compression/{{attack}}/seed{{seed}}/neural_cleanse/{{precision}}.safetensors",
    params:
        defense="neural_cleanse",
        config=plan.defense_config("neural_cleanse"),
        triggers={},
        calibration=DEPLOY["calibration_images"],
        target=plan.compression_target,
        device=DEVICE,
        jobs_per_gpu=JOBS_PER_GPU,
    log:
        f"{RESULTS}/logs/compression_neural_cleanse/{{dataset}}/{{model}}/{{attack}}/seed{{seed}}/{{precision}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/compression_neural_cleanse/{{dataset}}/{{model}}/{{attack}}/seed{{seed}}/{{precision}}.tsv"


rule compression_attack_table:
    """The "compression-activated backdoors" table of one dataset."""
    input:
        evaluations=lambda wc: plan.compression_eval_targets(wc.dataset),
        nc=lambda wc: plan.compression_nc_targets(wc.dataset),
        clean_nc=lambda wc: plan.compression_clean_nc(wc.dataset),
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
