from pmoe_backdoor.jobs.poison import make_poison_file
from pmoe_backdoor.runtime import log_to

with log_to(snakemake.log[0]):
    make_poison_file(snakemake.input.data, snakemake.input.trigger, float(snakemake.wildcards.rate),
                     int(snakemake.wildcards.seed), snakemake.params.target, snakemake.params.exclude_target,
                     snakemake.output[0])
