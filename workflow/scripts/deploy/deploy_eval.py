from pmoe_backdoor.jobs.deploy import DeployEvalJob, deploy_eval_job
from pmoe_backdoor.jobs.wrapper import job_context

with job_context(snakemake) as job:
    deploy_eval_job(DeployEvalJob.from_context(job))
