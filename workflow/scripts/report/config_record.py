from pmoe_backdoor.jobs.report import config_record
from pmoe_backdoor.jobs.wrapper import job_context

with job_context(snakemake) as job:
    p = job.params
    config_record(p.config, dict(p.configfiles), dict(p.overrides), job.output.yaml, job.output.html)
