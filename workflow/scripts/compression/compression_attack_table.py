from pmoe_backdoor.jobs.compression import compression_table
from pmoe_backdoor.runtime import log_to

with log_to(snakemake.log[0]):
    i, out = snakemake.input, snakemake.output
    compression_table(list(i.evaluations), list(i.nc), list(i.clean_nc), out.csv, out.md, out.tex, out.html)
