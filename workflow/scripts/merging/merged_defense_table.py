from pmoe_backdoor.jobs.merging import merged_defense_table
from pmoe_backdoor.runtime import log_to

with log_to(snakemake.log[0]):
    o = snakemake.output
    merged_defense_table(list(snakemake.input), o.csv, o.md, o.tex, o.html)
