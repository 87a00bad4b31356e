from pmoe_backdoor.jobs.merging import merging_table
from pmoe_backdoor.jobs.wrapper import job_context

with job_context(snakemake) as job:
    out = job.output
    merging_table(list(job.input), job.params.target, out.csv, out.md, out.tex, out.html)
