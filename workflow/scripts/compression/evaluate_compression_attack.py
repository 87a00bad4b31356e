from pmoe_backdoor.jobs.compression import CompressionEvalJob, compression_eval_job
from pmoe_backdoor.jobs.wrapper import job_context

with job_context(snakemake) as job:
    compression_eval_job(CompressionEvalJob.from_context(job))
