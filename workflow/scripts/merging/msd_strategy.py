from pmoe_backdoor.jobs.merging import strategy_job
from pmoe_backdoor.jobs.wrapper import job_context

with job_context(snakemake) as job:
    w, p = job.wildcards, job.params
    strategy_job(int(w.n), w.coupling == "tied", dict(p.weights), dict(p.evolution), job.output[0], w.arch)
