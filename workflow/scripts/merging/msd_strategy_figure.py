from pmoe_backdoor.jobs.merging import strategy_figure
from pmoe_backdoor.jobs.wrapper import job_context

with job_context(snakemake) as job:
    strategy_figure(list(job.input), list(job.params.labels), job.output[0])
