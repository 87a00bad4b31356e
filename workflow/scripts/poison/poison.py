from pmoe_backdoor.jobs.poison import make_poison_file
from pmoe_backdoor.jobs.wrapper import job_context

with job_context(snakemake) as job:
    i, p, w = job.input, job.params, job.wildcards
    make_poison_file(i.data, i.trigger, float(w.rate), int(w.seed), p.target, p.exclude_target, job.output[0])
