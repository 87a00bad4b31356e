from pmoe_backdoor.jobs.merging import finetune_victim_job
from pmoe_backdoor.jobs.wrapper import job_context

with job_context(snakemake) as job:
    i, out = job.input, job.output
    finetune_victim_job(i.data, i.ancestor, i.poison, dict(job.params.finetune), int(job.params.seed), out.weights,
                        out.history, job.device)
