from pmoe_backdoor.jobs.analysis import routing_stats_figure, routing_stats_table
from pmoe_backdoor.jobs.wrapper import job_context

with job_context(snakemake) as job:
    out = job.output
    routing_stats_table(list(job.input), out.csv, out.md, out.tex, out.html)
    routing_stats_figure(out.csv, out.png)
