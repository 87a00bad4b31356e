from pmoe_backdoor.jobs.report import attack_table
from pmoe_backdoor.runtime import log_to

with log_to(snakemake.log[0]):
    attack_table(snakemake.input.runs, snakemake.input.paper, snakemake.wildcards.dataset,
                 snakemake.params.paper_name, snakemake.output.csv, snakemake.output.md, snakemake.output.tex,
                 snakemake.output.html)
