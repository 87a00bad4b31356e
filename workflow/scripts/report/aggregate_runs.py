from pmoe_backdoor.jobs.report import collect_runs
from pmoe_backdoor.runtime import log_to

with log_to(snakemake.log[0]):
    collect_runs(list(snakemake.input), snakemake.output.csv, snakemake.output.html)
