import _src  # noqa: F401  (puts this workflow's src/ first on sys.path)
from pmoe_backdoor.pipeline import log_to
from pmoe_backdoor.report import prune_sweep_figure

with log_to(snakemake.log[0]):
    prune_sweep_figure(list(snakemake.input), snakemake.output[0])
