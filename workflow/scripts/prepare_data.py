import _src  # noqa: F401  (puts this workflow's src/ first on sys.path)
from pmoe_backdoor.pipeline import log_to, prepare_data

with log_to(snakemake.log[0]):
    prepare_data(dict(snakemake.params.spec), snakemake.output[0])
