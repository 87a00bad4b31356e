from pmoe_backdoor.jobs.report import attack_table
from pmoe_backdoor.jobs.wrapper import job_context

with job_context(snakemake) as job:
    out = job.output
    attack_table(job.input.runs, job.input.paper, job.wildcards.dataset, job.params.paper_name, out.csv, out.md,
                 out.tex, out.html)
