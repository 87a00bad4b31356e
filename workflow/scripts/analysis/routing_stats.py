from pmoe_backdoor.jobs.analysis import routing_stats_job
from pmoe_backdoor.jobs.wrapper import job_context

with job_context(snakemake) as job:
    i, p = job.input, job.params
    routing_stats_job(i.data, i.weights, dict(p.triggers), job.output[0], p.target, job.device, job.run)
