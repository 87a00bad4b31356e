from pmoe_backdoor.jobs.analysis import trigger_examples_job
from pmoe_backdoor.jobs.wrapper import job_context

with job_context(snakemake) as job:
    trigger_examples_job(job.input.data, dict(zip(job.params.names, job.input.triggers)), list(job.params.classes),
                         job.output[0], f"Triggers on {job.wildcards.dataset} test images")
