import _src  # noqa: F401  (puts this workflow's src/ first on sys.path)
from pmoe_backdoor.pipeline import log_to
from pmoe_backdoor.report import attack_table

with log_to(snakemake.log[0]):
    attack_table(snakemake.input.runs, snakemake.input.paper, snakemake.wildcards.dataset,
                 snakemake.params.paper_name, snakemake.output.csv, snakemake.output.md, snakemake.output.tex)
