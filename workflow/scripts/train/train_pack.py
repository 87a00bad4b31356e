from pmoe_backdoor.jobs.train import TrainPackJob, train_pack_job
from pmoe_backdoor.jobs.wrapper import job_context

with job_context(snakemake) as job:
    train_pack_job(TrainPackJob.from_context(job))
