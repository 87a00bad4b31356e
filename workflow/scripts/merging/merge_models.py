from pmoe_backdoor.jobs.merging import merge_models_job
from pmoe_backdoor.runtime import log_to

with log_to(snakemake.log[0]):
    merge_models_job(list(snakemake.input.victims), snakemake.input.strategy, snakemake.params.roles,
                     snakemake.output[0])
