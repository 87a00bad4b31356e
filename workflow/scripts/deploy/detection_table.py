from pmoe_backdoor.jobs.deploy import detection_table, nc_mask_figure, trigger_footprint
from pmoe_backdoor.runtime import log_to

with log_to(snakemake.log[0]):
    p = snakemake.params
    detection_table(list(snakemake.input.summaries), snakemake.output.csv, snakemake.output.md, snakemake.output.tex,
                    snakemake.output.html)
    entries = [(label, masks, trigger_footprint(snakemake.input.data, trig, p.target) if trig else None)
               for label, masks, trig in zip(p.labels, p.masks, p.trigger_of_entry)]
    nc_mask_figure(entries, p.target, snakemake.output.png,
                   f"Neural Cleanse: reversed trigger of the target class, {snakemake.wildcards.dataset}")
