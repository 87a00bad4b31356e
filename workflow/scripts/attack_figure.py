from pmoe_backdoor.pipeline import log_to
from pmoe_backdoor.report import attack_figure

with log_to(snakemake.log[0]):
    attack_figure(snakemake.input.runs, snakemake.input.paper, dict(snakemake.params.paper_names),
                  snakemake.output[0])
