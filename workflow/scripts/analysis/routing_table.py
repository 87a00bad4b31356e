from pmoe_backdoor.jobs.analysis import routing_stats_figure, routing_stats_table
from pmoe_backdoor.runtime import log_to

with log_to(snakemake.log[0]):
    routing_stats_table(list(snakemake.input), snakemake.output.csv, snakemake.output.md, snakemake.output.tex,
                        snakemake.output.html)
    routing_stats_figure(snakemake.output.csv, snakemake.output.png)
