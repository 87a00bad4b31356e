# Beyond the paper: every model evaluated as deployed (fp32 / int8 / int4) and Neural Cleanse detection.


rule deploy_eval:
    """BA, ASR and routing change of one trained model at each deployment precision."""
    input:
        data=f"{RESULTS}/data/{{dataset}}.npz",
        weights=f"{RESULTS}/{{dataset}}/{{model}}/{{attack}}/seed{{seed}}/weights.safetensors",
        trigger=plan.trigger_file,
    output:
        f"{RESULTS}/{{dataset}}/{{model}}/{{attack}}/seed{{seed}}/deployed.json",
    params:
        precisions=DEPLOY["precisions"],
        calibration=DEPLOY["calibration_images"],
        target=TARGET,
        batch_size=config["evaluation"]["batch_size"],
        device=DEVICE,
        jobs_per_gpu=JOBS_PER_GPU,
    log:
        f"{RESULTS}/logs/deploy_eval/{{dataset}}/{{model}}/{{attack}}/seed{{seed}}.log",
    threads: THREADS
    resources:
        **GPU_JOB,
    conda:
        "../envs/pmoe.yaml"
    script:
        "../workflow/scripts/deploy/deploy_eval.py"


use rule deploy_eval as deploy_eval_fine_pruned with:
    input:
        data=f"{RESULTS}/data/{{dataset}}.npz",
        weights=f"{RESULTS}/{{dataset}}/{{model}}/{{attack}}/seed{{seed}}/fineprune/{{variant}}/{{prune}}/weights.safetensors",
        trigger=plan.trigger_file,
    output:
        f"{RESULTS}/{{dataset}}/{{model}}/{{attack}}/seed{{seed}}/fineprune/{{variant}}/{{prune}}/deployed.json",
    log:
        f"{RESULTS}/logs/deploy_eval/{{dataset}}/{{model}}/{{attack}}/seed{{seed}}/fineprune/{{variant}}/{{prune}}.log",


rule precision_table:
    """ASR and BA by precision, trigger and rate (and of the Fine-Pruned models), mean ± std over seeds; one table
    per dataset, all from one job: per dataset its jobs would sit at different depths of the DAG (only some datasets
    have Fine-Pruned models) and the report's rule graph would show the rule twice."""
    input:
        [f for d in DATASETS for f in plan.deploy_targets(d)],
    output:
        **{
            f"{kind}_{d}": f"{RESULTS}/tables/precision_{d}.{kind}"
            for d in DATASETS
            for kind in ("csv", "md", "tex")
        },
        **{
            f"html_{d}": report(
                f"{RESULTS}/tables/precision_{d}.html",
                caption="../reports/precision_table.rst",
                category="Deployment precision",
                subcategory=d,
            )
            for d in DATASETS
        },
    params:
        inputs={d: plan.deploy_targets(d) for d in DATASETS},
    log:
        f"{RESULTS}/logs/precision_table.log",
    conda:
        "../envs/pmoe.yaml"
    script:
        "../workflow/scripts/deploy/precision_table.py"


rule detection_table:
    """Neural Cleanse detection rates per trigger, rate and precision; reversed masks beside the real triggers."""
    input:
        summaries=lambda wc: plan.nc_targets(wc.dataset),
        masks=lambda wc: plan.nc_mask_entries(wc.dataset)["masks"],
        triggers=lambda wc: plan.nc_mask_entries(wc.dataset)["triggers"],
        data=f"{RESULTS}/data/{{dataset}}.npz",
    output:
        csv=f"{RESULTS}/tables/detection_{{dataset}}.csv",
        md=f"{RESULTS}/tables/detection_{{dataset}}.md",
        tex=f"{RESULTS}/tables/detection_{{dataset}}.tex",
        html=report(
            f"{RESULTS}/tables/detection_{{dataset}}.html",
            caption="../reports/detection_table.rst",
            category="Neural Cleanse",
            subcategory="{dataset}",
        ),
        png=report(
            f"{RESULTS}/figures/nc_masks_{{dataset}}.png",
            caption="../reports/nc_masks.rst",
            category="Neural Cleanse",
            subcategory="{dataset}",
        ),
    params:
        labels=lambda wc: plan.nc_mask_entries(wc.dataset)["labels"],
        masks=lambda wc: plan.nc_mask_entries(wc.dataset)["masks"],
        trigger_of_entry=lambda wc: plan.nc_mask_entries(wc.dataset)["trigger_of_entry"],
        target=TARGET,
    log:
        f"{RESULTS}/logs/detection_table/{{dataset}}.log",
    conda:
        "../envs/pmoe.yaml"
    script:
        "../workflow/scripts/deploy/detection_table.py"
