from pmoe_backdoor.jobs.report import fine_pruning_table
from pmoe_backdoor.runtime import log_to

with log_to(snakemake.log[0]):
    fine_pruning_table(list(snakemake.input.runs), snakemake.output.csv, snakemake.output.md, snakemake.output.tex,
                       snakemake.input.paper, dict(snakemake.params.paper_names),
                       out_html=snakemake.output.html)
