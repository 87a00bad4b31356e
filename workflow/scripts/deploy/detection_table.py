from pmoe_backdoor.jobs.deploy import detection_table, nc_mask_entries, nc_mask_figure
from pmoe_backdoor.jobs.wrapper import job_context

with job_context(snakemake) as job:
    i, p, out = job.input, job.params, job.output
    detection_table(list(i.summaries), out.csv, out.md, out.tex, out.html)
    nc_mask_figure(nc_mask_entries(i.data, p.labels, p.masks, p.trigger_of_entry, p.target), p.target, out.png,
                   f"Neural Cleanse: reversed trigger of the target class, {job.wildcards.dataset}")
