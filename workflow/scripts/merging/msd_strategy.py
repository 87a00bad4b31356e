from pmoe_backdoor.jobs.merging import strategy_job
from pmoe_backdoor.runtime import log_to

with log_to(snakemake.log[0]):
    w = snakemake.wildcards
    strategy_job(int(w.n), w.coupling == "tied", dict(snakemake.params.weights), dict(snakemake.params.evolution),
                 snakemake.output[0])
