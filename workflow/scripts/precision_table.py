import _src  # noqa: F401  (puts this workflow's src/ first on sys.path)
from pmoe_backdoor.pipeline import log_to
from pmoe_backdoor.report import precision_table

with log_to(snakemake.log[0]):
    precision_table(list(snakemake.input), snakemake.output.csv, snakemake.output.md, snakemake.output.tex)
