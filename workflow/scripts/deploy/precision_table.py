from pmoe_backdoor.jobs.deploy import precision_table
from pmoe_backdoor.runtime import log_to

with log_to(snakemake.log[0]):
    for dataset, paths in snakemake.params.inputs.items():
        out = {kind: getattr(snakemake.output, f"{kind}_{dataset}") for kind in ("csv", "md", "tex", "html")}
        precision_table(list(paths), out["csv"], out["md"], out["tex"], out["html"])
