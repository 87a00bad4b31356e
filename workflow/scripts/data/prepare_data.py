from pmoe_backdoor.jobs.data import prepare_data
from pmoe_backdoor.runtime import log_to

with log_to(snakemake.log[0]):
    prepare_data(dict(snakemake.params.spec), snakemake.output[0])
