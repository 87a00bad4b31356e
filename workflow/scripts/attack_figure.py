import _src  # noqa: F401  (puts this workflow's src/ first on sys.path)
from pmoe_backdoor.pipeline import log_to
from pmoe_backdoor.report import attack_figure

with log_to(snakemake.log[0]):
    attack_figure(list(snakemake.input.runs), snakemake.input.paper, dict(snakemake.params.paper_names),
                  snakemake.output[0])
