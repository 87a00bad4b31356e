import _src  # noqa: F401  (puts this workflow's src/ first on sys.path)
from pmoe_backdoor.pipeline import log_to, trigger_examples_job

with log_to(snakemake.log[0]):
    trigger_examples_job(snakemake.input.data, dict(zip(snakemake.params.names, snakemake.input.triggers)),
                         list(snakemake.params.classes), snakemake.output[0],
                         f"Triggers on {snakemake.wildcards.dataset} test images")
