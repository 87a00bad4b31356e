from pmoe_backdoor.jobs.report import prune_sweep_figure
from pmoe_backdoor.jobs.wrapper import job_context

with job_context(snakemake) as job:
    prune_sweep_figure(list(job.input), job.output[0])
