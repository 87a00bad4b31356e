import _src  # noqa: F401  (puts this workflow's src/ first on sys.path)
from pmoe_backdoor.pipeline import log_to
from pmoe_backdoor.report import collect_runs

with log_to(snakemake.log[0]):
    collect_runs(list(snakemake.input), snakemake.output[0])
