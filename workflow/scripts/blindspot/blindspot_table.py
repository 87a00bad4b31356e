from pmoe_backdoor.jobs.blindspot import blindspot_figure, blindspot_table
from pmoe_backdoor.jobs.wrapper import job_context

with job_context(snakemake) as job:
    i, p, out = job.input, job.params, job.output
    blindspot_table(list(i.defenses), list(i.deployed), list(i.fine_pruned), p.fp_asr_level, p.paper_name, out.csv,
                    out.md, out.tex, out.html, precisions=list(p.precisions))
    blindspot_figure([out.csv], out.png)
