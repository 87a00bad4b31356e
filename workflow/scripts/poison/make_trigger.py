from pmoe_backdoor.jobs.poison import make_trigger_file, trigger_seed
from pmoe_backdoor.jobs.wrapper import job_context

with job_context(snakemake) as job:
    p = job.params
    make_trigger_file(p.kind, dict(p.params), trigger_seed(p.kind, p.trigger_seed, int(job.wildcards.seed)),
                      job.output[0])
