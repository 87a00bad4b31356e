from pmoe_backdoor.jobs.poison import clean_record_file
from pmoe_backdoor.jobs.wrapper import job_context

with job_context(snakemake) as job:
    clean_record_file(job.input.data, job.output[0])
