from pmoe_backdoor.jobs.merging import merging_table
from pmoe_backdoor.runtime import log_to

with log_to(snakemake.log[0]):
    o = snakemake.output
    merging_table(list(snakemake.input), snakemake.params.target, o.csv, o.md, o.tex, o.html)
