from pmoe_backdoor.jobs.evaluate import evaluate_job
from pmoe_backdoor.jobs.wrapper import job_context

with job_context(snakemake) as job:
    i, p = job.input, job.params
    evaluate_job(i.data, i.weights, job.output[0], i.trigger or None, p.target, p.batch_size, job.device, job.run)
