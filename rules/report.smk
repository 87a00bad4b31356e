rule aggregate_runs:
    """Every run's metrics of one dataset in one table (one row per model, attack and seed)."""
    input:
        lambda wc: [f"{run}/metrics.json" for run in run_dirs([wc.dataset])],
    output:
        report(
            f"{RESULTS}/tables/runs_{{dataset}}.csv",
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
        csv=report(
            f"{RESULTS}/tables/attacks_{{dataset}}.csv",
            caption="../reports/attack_table.rst",
            category="Attack tables",
            subcategory="{dataset}",
        ),
        md=report(
            f"{RESULTS}/tables/attacks_{{dataset}}.md",
            caption="../reports/attack_table.rst",
            category="Attack tables",
            subcategory="{dataset}",
        ),
        tex=f"{RESULTS}/tables/attacks_{{dataset}}.tex",
    params:
        paper_name=lambda wc: paper_names()[wc.dataset],
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
        paper_names=paper_names(),
    log:
        f"{RESULTS}/logs/attack_figure.log",
    conda:
        "../envs/pmoe.yaml"
    script:
        "../workflow/scripts/report/attack_figure.py"


rule fine_pruning_table:
    """Table 3: CA and ASR before the defense, after pruning and after fine-tuning, mean and std over runs."""
    input:
        runs=fine_prune_targets(),
        paper=workflow.source_path("../config/paper-table-3.csv"),
    output:
        csv=report(
            f"{RESULTS}/tables/fine_pruning.csv",
            caption="../reports/fine_pruning.rst",
            category="Fine-Pruning",
        ),
        md=report(
            f"{RESULTS}/tables/fine_pruning.md",
            caption="../reports/fine_pruning.rst",
            category="Fine-Pruning",
        ),
        tex=f"{RESULTS}/tables/fine_pruning.tex",
    params:
        paper_names=paper_names(),
    log:
        f"{RESULTS}/logs/fine_pruning_table.log",
    conda:
        "../envs/pmoe.yaml"
    script:
        "../workflow/scripts/report/fine_pruning_table.py"


rule prune_sweep_figure:
    """CA and ASR after pruning alone, from 0 to 90 % of each expert's channels."""
    input:
        prune_sweep_targets(),
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
