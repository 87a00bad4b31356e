from pmoe_backdoor.jobs.report import collect_runs
from pmoe_backdoor.jobs.wrapper import job_context

with job_context(snakemake) as job:
    collect_runs(list(job.input), job.output.csv, job.output.html)
