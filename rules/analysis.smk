# Routing (patch-selection) analysis: the paper's Figures 2-6 and routing statistics over the test set.


rule trigger_examples:
    """Figure 2: test images of several classes with each trigger applied."""
    input:
        data=f"{RESULTS}/data/{{dataset}}.npz",
        triggers=lambda wc: plan.analysis_trigger_files(wc.dataset),
    output:
        report(
            f"{RESULTS}/figures/trigger_examples_{{dataset}}.png",
            caption="../reports/trigger_examples.rst",
            category="Routing analysis",
            subcategory="{dataset}",
        ),
    params:
        classes=lambda wc: plan.analysis_classes(wc.dataset),
        names=TRIGGERS,
    log:
        f"{RESULTS}/logs/trigger_examples/{{dataset}}.log",
    conda:
        "../envs/pmoe.yaml"
    script:
        "../workflow/scripts/analysis/trigger_examples.py"


rule routing_maps:
    """Figures 3-5: each expert's routed patches for chosen test images, clean model and each trigger's model
    (on its triggered image), and the patch-value distribution of what each expert receives."""
    input:
        data=f"{RESULTS}/data/{{dataset}}.npz",
        models=lambda wc: plan.model_files(plan.analysis_models(wc)),
    output:
        json=f"{RESULTS}/analysis/{{dataset}}/{{model}}/routing_maps.json",
        maps=report(
            f"{RESULTS}/figures/patch_maps_{{dataset}}_{{model}}.png",
            caption="../reports/patch_maps.rst",
            category="Routing analysis",
            subcategory="{dataset}",
        ),
        values=report(
            f"{RESULTS}/figures/patch_values_{{dataset}}_{{model}}.png",
            caption="../reports/patch_values.rst",
            category="Routing analysis",
            subcategory="{dataset}",
        ),
    params:
        models=plan.analysis_models,
        classes=lambda wc: plan.analysis_classes(wc.dataset),
        device=DEVICE,
        jobs_per_gpu=JOBS_PER_GPU,
    log:
        f"{RESULTS}/logs/routing_maps/{{dataset}}/{{model}}.log",
    threads: THREADS
    resources:
        **GPU_JOB,
    conda:
        "../envs/pmoe.yaml"
    script:
        "../workflow/scripts/analysis/routing_maps.py"


rule fineprune_routing_maps:
    """Figure 6: routing of the triggered image before and after Fine-Pruning."""
    input:
        data=f"{RESULTS}/data/{{dataset}}.npz",
        models=lambda wc: plan.model_files(plan.fineprune_models(wc)),
    output:
        json=f"{RESULTS}/analysis/{{dataset}}/{{model}}/fineprune_routing_maps.json",
        maps=report(
            f"{RESULTS}/figures/fineprune_patch_maps_{{dataset}}_{{model}}.png",
            caption="../reports/fineprune_patch_maps.rst",
            category="Fine-Pruning",
        ),
    params:
        models=plan.fineprune_models,
        classes=lambda wc: plan.analysis_classes(wc.dataset),
        device=DEVICE,
        jobs_per_gpu=JOBS_PER_GPU,
    log:
        f"{RESULTS}/logs/fineprune_routing_maps/{{dataset}}/{{model}}.log",
    threads: THREADS
    resources:
        **GPU_JOB,
    conda:
        "../envs/pmoe.yaml"
    script:
        "../workflow/scripts/analysis/fineprune_routing_maps.py"


rule routing_stats:
    """Over the whole non-target test set: how often the square trigger's patch reaches the experts."""
    input:
        data=f"{RESULTS}/data/{{dataset}}.npz",
        weights=f"{RESULTS}/{{dataset}}/{{model}}/{{attack}}/seed{{seed}}/weights.safetensors",
        triggers=lambda wc: list(plan.routing_stats_triggers(wc).values()),
    output:
        f"{RESULTS}/{{dataset}}/{{model}}/{{attack}}/seed{{seed}}/routing_stats.json",
    params:
        triggers=plan.routing_stats_triggers,
        target=TARGET,
        device=DEVICE,
        jobs_per_gpu=JOBS_PER_GPU,
    log:
        f"{RESULTS}/logs/routing_stats/{{dataset}}/{{model}}/{{attack}}/seed{{seed}}.log",
    threads: THREADS
    resources:
        **GPU_JOB,
    conda:
        "../envs/pmoe.yaml"
    script:
        "../workflow/scripts/analysis/routing_stats.py"


rule routing_table:
    """The routing statistics of one dataset as a table (mean ± std over seeds) and a figure."""
    input:
        lambda wc: plan.routing_stats_targets(wc.dataset),
    output:
        csv=f"{RESULTS}/tables/routing_{{dataset}}.csv",
        md=f"{RESULTS}/tables/routing_{{dataset}}.md",
        tex=f"{RESULTS}/tables/routing_{{dataset}}.tex",
        html=report(
            f"{RESULTS}/tables/routing_{{dataset}}.html",
            caption="../reports/routing_table.rst",
            category="Routing analysis",
            subcategory="{dataset}",
        ),
        png=report(
            f"{RESULTS}/figures/routing_{{dataset}}.png",
            caption="../reports/routing_table.rst",
            category="Routing analysis",
            subcategory="{dataset}",
        ),
    log:
        f"{RESULTS}/logs/routing_table/{{dataset}}.log",
    conda:
        "../envs/pmoe.yaml"
    script:
        "../workflow/scripts/analysis/routing_table.py"
