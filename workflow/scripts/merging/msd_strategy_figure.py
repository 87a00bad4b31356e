from pmoe_backdoor.jobs.merging import strategy_figure
from pmoe_backdoor.runtime import log_to

with log_to(snakemake.log[0]):
    strategy_figure(list(snakemake.input), list(snakemake.params.labels), snakemake.output[0])
