from pmoe_backdoor.jobs.blindspot import blindspot_figure, blindspot_table
from pmoe_backdoor.runtime import log_to

with log_to(snakemake.log[0]):
    out, p = snakemake.output, snakemake.params
    blindspot_table(list(snakemake.input.defenses), list(snakemake.input.deployed), list(snakemake.input.fine_pruned),
                    p.fp_asr_level, p.paper_name, out.csv, out.md, out.tex, out.html,
                    precisions=list(p.precisions))
    blindspot_figure([out.csv], out.png)
