from pmoe_backdoor.jobs.report import attack_figure
from pmoe_backdoor.jobs.wrapper import job_context

with job_context(snakemake) as job:
    attack_figure(list(job.input.runs), job.input.paper, dict(job.params.paper_names), job.output[0])
