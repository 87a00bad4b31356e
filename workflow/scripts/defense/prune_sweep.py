from pmoe_backdoor.jobs.defense import PruneSweepJob, prune_sweep_job
from pmoe_backdoor.jobs.wrapper import job_context

with job_context(snakemake) as job:
    prune_sweep_job(PruneSweepJob.from_context(job))
