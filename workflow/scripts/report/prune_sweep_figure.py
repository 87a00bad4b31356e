from pmoe_backdoor.jobs.report import prune_sweep_figure
from pmoe_backdoor.runtime import log_to

with log_to(snakemake.log[0]):
    prune_sweep_figure(list(snakemake.input), snakemake.output[0])
