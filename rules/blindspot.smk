# The quantization blindspot (Pandey & Ye): every registered defense (the defend rule, rules/defense.smk) on each
# model as deployed at each precision, and one table and figure per dataset with Fine-Pruning beside them.


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


rule localisation_figure:
    """The patch-ablation defenses' localisation maps: the trigger's footprint, the router and Grad-CAM rankings
    and the single-patch occlusion effect for a few triggered inputs of each attacked model."""
    input:
        lambda wc: [path for entry in plan.localisation_entries(wc.dataset) for path in entry["maps"].values()],
    output:
        report(
            f"{RESULTS}/figures/localisation_{{dataset}}.png",
            caption="../reports/localisation_figure.rst",
            category="Quantization blindspot",
            subcategory="{dataset}",
        ),
    params:
        entries=lambda wc: plan.localisation_entries(wc.dataset),
    log:
        f"{RESULTS}/logs/localisation_figure/{{dataset}}.log",
    conda:
        "../envs/pmoe.yaml"
    script:
        "../workflow/scripts/blindspot/localisation_figure.py"
