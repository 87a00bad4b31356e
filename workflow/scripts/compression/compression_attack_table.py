from pmoe_backdoor.jobs.compression import compression_table
from pmoe_backdoor.jobs.wrapper import job_context

with job_context(snakemake) as job:
    i, out = job.input, job.output
    compression_table(list(i.evaluations), list(i.nc), list(i.clean_nc), out.csv, out.md, out.tex, out.html)
