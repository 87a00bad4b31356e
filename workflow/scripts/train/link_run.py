from pmoe_backdoor.jobs.train import link_run
from pmoe_backdoor.runtime import log_to

with log_to(snakemake.log[0]):
    link_run(snakemake.input[0], int(snakemake.wildcards.seed), snakemake.output.weights, snakemake.output.history)
