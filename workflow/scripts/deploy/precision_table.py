from pmoe_backdoor.jobs.deploy import precision_table
from pmoe_backdoor.runtime import log_to

with log_to(snakemake.log[0]):
    precision_table(list(snakemake.input), snakemake.output.csv, snakemake.output.md, snakemake.output.tex)
