from pmoe_backdoor.jobs.data import prepare_data
from pmoe_backdoor.jobs.wrapper import job_context

with job_context(snakemake) as job:
    prepare_data(dict(job.params.spec), job.output[0])
