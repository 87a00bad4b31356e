from pmoe_backdoor.jobs.train import TrainJob, train_job
from pmoe_backdoor.jobs.wrapper import job_context

with job_context(snakemake) as job:
    train_job(TrainJob.from_context(job))
