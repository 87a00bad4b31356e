from pmoe_backdoor.jobs.report import config_record
from pmoe_backdoor.runtime import log_to

with log_to(snakemake.log[0]):
    p = snakemake.params
    config_record(p.config, dict(p.configfiles), dict(p.overrides), snakemake.output.yaml, snakemake.output.html)
