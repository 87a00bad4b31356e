import _src  # noqa: F401  (puts this workflow's src/ first on sys.path)
from pmoe_backdoor.pipeline import log_to
from pmoe_backdoor.report import fine_pruning_table

with log_to(snakemake.log[0]):
    fine_pruning_table(list(snakemake.input.runs), snakemake.output.csv, snakemake.output.md, snakemake.output.tex,
                       snakemake.input.paper, dict(snakemake.params.paper_names))
