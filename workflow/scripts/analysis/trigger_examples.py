from pmoe_backdoor.jobs.analysis import trigger_examples_job
from pmoe_backdoor.runtime import log_to

with log_to(snakemake.log[0]):
    trigger_examples_job(snakemake.input.data, dict(zip(snakemake.params.names, snakemake.input.triggers)),
                         list(snakemake.params.classes), snakemake.output[0],
                         f"Triggers on {snakemake.wildcards.dataset} test images")
