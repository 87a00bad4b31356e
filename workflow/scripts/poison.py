import _src  # noqa: F401  (puts this workflow's src/ first on sys.path)
from pmoe_backdoor.pipeline import log_to, make_poison_file

with log_to(snakemake.log[0]):
    make_poison_file(snakemake.input.data, snakemake.input.trigger, float(snakemake.wildcards.rate),
                     int(snakemake.wildcards.seed), snakemake.params.target, snakemake.params.exclude_target,
                     snakemake.output[0])
