from pmoe_backdoor.jobs.poison import clean_record_file
from pmoe_backdoor.runtime import log_to

with log_to(snakemake.log[0]):
    clean_record_file(snakemake.input.data, snakemake.output[0])
