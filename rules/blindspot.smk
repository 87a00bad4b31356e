# The quantization blindspot (Pandey & Ye) - STRIP, Activation Clustering and Spectral Signatures on each
# model as deployed at each precision, and one table and figure per dataset with Neural Cleanse and Fine-Pruning.


rule strip:
    """STRIP on one model at one deployment precision: threshold at the configured FRR on held-out clean test
    images, FAR on triggered ones, and the model-level flag."""
    input:
        data=f"{RESULTS}/data/{{dataset}}.npz",
        weights=f"{RESULTS}/{{dataset}}/{{model}}/{{attack}}/seed{{seed}}/weights.safetensors",
        triggers=lambda wc: list(plan.strip_triggers(wc).values()),
    output:
        f"{RESULTS}/{{dataset}}/{{model}}/{{attack}}/seed{{seed}}/strip/{{precision}}.json",
    params:
        strip=canonical(config["strip"]),
        triggers=plan.strip_triggers,
        calibration=DEPLOY["calibration_images"],
        target=TARGET,
        device=DEVICE,
        jobs_per_gpu=JOBS_PER_GPU,
    log:
        f"{RESULTS}/logs/strip/{{dataset}}/{{model}}/{{attack}}/seed{{seed}}/{{precision}}.log",
    threads: THREADS
    resources:
        **GPU_JOB,
    conda:
        "../envs/pmoe.yaml"
    script:
        "../workflow/scripts/blindspot/strip.py"


rule activation_clustering:
    """Activation Clustering of the model's training set (poisoned for an attack) with the features of the model
    as deployed at one precision: flagged labels, precision/recall against the true poisoned indices."""
    input:
        data=f"{RESULTS}/data/{{dataset}}.npz",
        weights=f"{RESULTS}/{{dataset}}/{{model}}/{{attack}}/seed{{seed}}/weights.safetensors",
        poison=plan.poison_file,
    output:
        f"{RESULTS}/{{dataset}}/{{model}}/{{attack}}/seed{{seed}}/activation_clustering/{{precision}}.json",
    params:
        config=canonical(config["activation_clustering"]),
        calibration=DEPLOY["calibration_images"],
        device=DEVICE,
        jobs_per_gpu=JOBS_PER_GPU,
    log:
        f"{RESULTS}/logs/activation_clustering/{{dataset}}/{{model}}/{{attack}}/seed{{seed}}/{{precision}}.log",
    threads: THREADS
    resources:
        **GPU_JOB,
    conda:
        "../envs/pmoe.yaml"
    script:
        "../workflow/scripts/blindspot/activation_clustering.py"


rule spectral_signatures:
    """Spectral Signatures of the model's training set with the features of the model as deployed at one
    precision: removal recall and the model-level flag."""
    input:
        data=f"{RESULTS}/data/{{dataset}}.npz",
        weights=f"{RESULTS}/{{dataset}}/{{model}}/{{attack}}/seed{{seed}}/weights.safetensors",
        poison=plan.poison_file,
    output:
        f"{RESULTS}/{{dataset}}/{{model}}/{{attack}}/seed{{seed}}/spectral_signatures/{{precision}}.json",
    params:
        config=canonical(config["spectral_signatures"]),
        calibration=DEPLOY["calibration_images"],
        device=DEVICE,
        jobs_per_gpu=JOBS_PER_GPU,
    log:
        f"{RESULTS}/logs/spectral_signatures/{{dataset}}/{{model}}/{{attack}}/seed{{seed}}/{{precision}}.log",
    threads: THREADS
    resources:
        **GPU_JOB,
    conda:
        "../envs/pmoe.yaml"
    script:
        "../workflow/scripts/blindspot/spectral_signatures.py"


rule blindspot_table:
    """The five defenses x precision x trigger x rate: detection rate over attacked models, false positives over
    clean ones, ASR and BA at that precision, beside Pandey & Ye's claims; the detection-rate figure."""
    input:
        defenses=lambda wc: plan.blindspot_inputs(wc.dataset)["defenses"],
        deployed=lambda wc: plan.blindspot_inputs(wc.dataset)["deployed"],
        fine_pruned=lambda wc: plan.blindspot_inputs(wc.dataset)["fine_pruned"],
    output:
        csv=f"{RESULTS}/tables/blindspot_{{dataset}}.csv",
        md=f"{RESULTS}/tables/blindspot_{{dataset}}.md",
        tex=f"{RESULTS}/tables/blindspot_{{dataset}}.tex",
        html=report(
            f"{RESULTS}/tables/blindspot_{{dataset}}.html",
            caption="../reports/blindspot_table.rst",
            category="Quantization blindspot",
            subcategory="{dataset}",
        ),
        png=report(
            f"{RESULTS}/figures/blindspot_{{dataset}}.png",
            caption="../reports/blindspot_figure.rst",
            category="Quantization blindspot",
            subcategory="{dataset}",
        ),
    params:
        fp_asr_level=plan.blind["fine_pruning_asr"],
        precisions=plan.blind.get("precisions", []),
        paper_name=lambda wc: plan.paper_names()[wc.dataset],
    log:
        f"{RESULTS}/logs/blindspot_table/{{dataset}}.log",
    conda:
        "../envs/pmoe.yaml"
    script:
        "../workflow/scripts/blindspot/blindspot_table.py"
