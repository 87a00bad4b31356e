from pmoe_backdoor.jobs.report import attack_figure
from pmoe_backdoor.runtime import log_to

with log_to(snakemake.log[0]):
    attack_figure(list(snakemake.input.runs), snakemake.input.paper, dict(snakemake.params.paper_names),
                  snakemake.output[0])
