from pmoe_backdoor.jobs.defense import FinePruneJob, fine_prune_job
from pmoe_backdoor.jobs.wrapper import job_context

with job_context(snakemake) as job:
    fine_prune_job(FinePruneJob.from_context(job))
