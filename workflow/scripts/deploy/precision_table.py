from pmoe_backdoor.jobs.deploy import precision_table
from pmoe_backdoor.jobs.wrapper import job_context

with job_context(snakemake) as job:
    for dataset, paths in job.params.inputs.items():
        out = {kind: getattr(job.output, f"{kind}_{dataset}") for kind in ("csv", "md", "tex", "html")}
        precision_table(list(paths), out["csv"], out["md"], out["tex"], out["html"])
