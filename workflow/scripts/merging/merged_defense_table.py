from pmoe_backdoor.jobs.merging import merged_defense_table
from pmoe_backdoor.jobs.wrapper import job_context

with job_context(snakemake) as job:
    out = job.output
    merged_defense_table(list(job.input), out.csv, out.md, out.tex, out.html)
