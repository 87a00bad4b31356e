import _src  # noqa: F401  (puts this workflow's src/ first on sys.path)
from pmoe_backdoor.figures import nc_mask_figure, trigger_footprint
from pmoe_backdoor.pipeline import log_to
from pmoe_backdoor.report import detection_table

with log_to(snakemake.log[0]):
    detection_table(list(snakemake.input.summaries), snakemake.output.csv, snakemake.output.md, snakemake.output.tex)
    entries = [(label, masks, trigger_footprint(snakemake.input.data, trig, snakemake.params.target) if trig else None)
               for label, masks, trig in zip(snakemake.params.labels, snakemake.params.masks,
                                             snakemake.params.trigger_of_entry)]
    nc_mask_figure(entries, snakemake.params.target, snakemake.output.png,
                   f"Neural Cleanse: reversed trigger of the target class, {snakemake.wildcards.dataset}")
