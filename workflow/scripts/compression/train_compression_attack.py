from pmoe_backdoor.jobs.compression import CompressionAttackJob, compression_attack_job
from pmoe_backdoor.jobs.wrapper import job_context

with job_context(snakemake) as job:
    compression_attack_job(CompressionAttackJob.from_context(job))
