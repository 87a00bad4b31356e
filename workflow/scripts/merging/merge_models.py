from pmoe_backdoor.jobs.merging import merge_models_job
from pmoe_backdoor.jobs.wrapper import job_context

with job_context(snakemake) as job:
    merge_models_job(list(job.input.victims), job.input.strategy, job.params.roles, job.output[0])
