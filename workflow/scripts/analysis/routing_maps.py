from pmoe_backdoor.jobs.analysis import patch_map_figure, patch_value_figure, routing_maps_job
from pmoe_backdoor.jobs.wrapper import job_context

with job_context(snakemake) as job:
    w, out = job.wildcards, job.output
    routing_maps_job(job.input.data, dict(job.params.models), list(job.params.classes), out.json, job.device)
    patch_map_figure(out.json, out.maps, f"Patch routing: {w.dataset}, {w.model}")
    patch_value_figure(out.json, out.values, f"Patch values received by each expert: {w.dataset}, {w.model}")
