from pmoe_backdoor.jobs.report import fine_pruning_table
from pmoe_backdoor.jobs.wrapper import job_context

with job_context(snakemake) as job:
    out = job.output
    fine_pruning_table(list(job.input.runs), out.csv, out.md, out.tex, job.input.paper, dict(job.params.paper_names),
                       out_html=out.html)
