from pmoe_backdoor.jobs.blindspot import localisation_figure
from pmoe_backdoor.jobs.wrapper import job_context

with job_context(snakemake) as job:
    localisation_figure(list(job.params.entries), job.output[0])
