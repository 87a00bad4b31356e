from pmoe_backdoor.jobs.train import link_run
from pmoe_backdoor.jobs.wrapper import job_context

with job_context(snakemake) as job:
    link_run(job.input[0], int(job.wildcards.seed), job.output.weights, job.output.history)
