import _src  # noqa: F401  (puts this workflow's src/ first on sys.path)
from pmoe_backdoor.figures import routing_stats_figure, routing_stats_table
from pmoe_backdoor.pipeline import log_to

with log_to(snakemake.log[0]):
    routing_stats_table(list(snakemake.input), snakemake.output.csv, snakemake.output.md, snakemake.output.tex)
    routing_stats_figure(snakemake.output.csv, snakemake.output.png)
