from pmoe_backdoor.jobs.poison import make_trigger_file, trigger_seed
from pmoe_backdoor.runtime import log_to

with log_to(snakemake.log[0]):
    seed = trigger_seed(snakemake.params.kind, snakemake.params.trigger_seed, int(snakemake.wildcards.seed))
    make_trigger_file(snakemake.params.kind, dict(snakemake.params.params), seed, snakemake.output[0])
