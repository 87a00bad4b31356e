from pmoe_backdoor.reporting.configpage import configfile_texts


rule aggregate_runs:
    """Every run's metrics of one dataset in one table (one row per model, attack and seed)."""
    input:
        lambda wc: [f"{run}/metrics.json" for run in plan.run_dirs([wc.dataset])],
    output:
        csv=f"{RESULTS}/tables/runs_{{dataset}}.csv",
        html=report(
            f"{RESULTS}/tables/runs_{{dataset}}.html",
            caption="../reports/runs.rst",
            category="Per-run metrics",
        ),
    log:
        f"{RESULTS}/logs/aggregate_runs/{{dataset}}.log",
    conda:
        "../envs/pmoe.yaml"
    script:
        "../workflow/scripts/report/aggregate_runs.py"


rule attack_table:
    """Tables 1 (CIFAR-10) and 2 (GTSRB): ASR, BA and CAD, mean and std over seeds, beside the paper."""
    input:
        runs=f"{RESULTS}/tables/runs_{{dataset}}.csv",
        paper=workflow.source_path("../config/paper-tables-1-2.csv"),
    output:
        csv=f"{RESULTS}/tables/attacks_{{dataset}}.csv",
        md=f"{RESULTS}/tables/attacks_{{dataset}}.md",
        tex=f"{RESULTS}/tables/attacks_{{dataset}}.tex",
        html=report(
            f"{RESULTS}/tables/attacks_{{dataset}}.html",
            caption="../reports/attack_table.rst",
            category="Attack tables",
            subcategory="{dataset}",
        ),
    params:
        paper_name=lambda wc: plan.paper_names()[wc.dataset],
    log:
        f"{RESULTS}/logs/attack_table/{{dataset}}.log",
    conda:
        "../envs/pmoe.yaml"
    script:
        "../workflow/scripts/report/attack_table.py"


rule attack_figure:
    """ASR and BA against the poisoning rate, per trigger and dataset, with the paper's values."""
    input:
        runs=[f"{RESULTS}/tables/runs_{d}.csv" for d in DATASETS],
        paper=workflow.source_path("../config/paper-tables-1-2.csv"),
    output:
        report(
            f"{RESULTS}/figures/asr_ba_vs_rate.png",
            caption="../reports/asr_ba_vs_rate.rst",
            category="Attack figures",
        ),
    params:
        paper_names=plan.paper_names(),
    log:
        f"{RESULTS}/logs/attack_figure.log",
    conda:
        "../envs/pmoe.yaml"
    script:
        "../workflow/scripts/report/attack_figure.py"


rule fine_pruning_table:
    """Table 3: CA and ASR before the defense, after pruning and after fine-tuning, mean and std over runs."""
    input:
        runs=plan.fine_prune_targets(),
        paper=workflow.source_path("../config/paper-table-3.csv"),
    output:
        csv=f"{RESULTS}/tables/fine_pruning.csv",
        md=f"{RESULTS}/tables/fine_pruning.md",
        tex=f"{RESULTS}/tables/fine_pruning.tex",
        html=report(
            f"{RESULTS}/tables/fine_pruning.html",
            caption="../reports/fine_pruning.rst",
            category="Fine-Pruning",
        ),
    params:
        paper_names=plan.paper_names(),
    log:
        f"{RESULTS}/logs/fine_pruning_table.log",
    conda:
        "../envs/pmoe.yaml"
    script:
        "../workflow/scripts/report/fine_pruning_table.py"


rule prune_sweep_figure:
    """CA and ASR after pruning alone, from 0 to 90 % of each expert's channels."""
    input:
        plan.prune_sweep_targets(),
    output:
        report(
            f"{RESULTS}/figures/prune_sweep.png",
            caption="../reports/prune_sweep.rst",
            category="Fine-Pruning",
        ),
    log:
        f"{RESULTS}/logs/prune_sweep_figure.log",
    conda:
        "../envs/pmoe.yaml"
    script:
        "../workflow/scripts/report/prune_sweep_figure.py"


rule config_record:
    """The exact configuration of this run for the report: the merged config as YAML, and a page with it and with
    each config file given. Its params are the canonical config, so any change to the config reruns it."""
    output:
        yaml=f"{RESULTS}/config/config.yaml",
        html=report(
            f"{RESULTS}/config/config.html",
            caption="../reports/config.rst",
            category="Configuration",
        ),
    params:
        config=canonical(config),
        configfiles=configfile_texts(workflow.configfiles),
        overrides=canonical(dict(workflow.config_settings.config)),
    log:
        f"{RESULTS}/logs/config_record.log",
    localrule: True
    conda:
        "../envs/pmoe.yaml"
    script:
        "../workflow/scripts/report/config_record.py"
