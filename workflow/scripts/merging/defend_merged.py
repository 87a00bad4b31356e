from pmoe_backdoor.jobs.merging import DefendMergedJob, defend_merged_job
from pmoe_backdoor.jobs.wrapper import job_context

with job_context(snakemake) as job:
    defend_merged_job(DefendMergedJob.from_context(job))
