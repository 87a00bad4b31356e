from pmoe_backdoor.jobs.analysis import patch_map_figure, routing_maps_job
from pmoe_backdoor.jobs.wrapper import job_context

with job_context(snakemake) as job:
    routing_maps_job(job.input.data, dict(job.params.models), list(job.params.classes), job.output.json, job.device)
    patch_map_figure(job.output.json, job.output.maps,
                     f"Patch routing before and after Fine-Pruning: {job.wildcards.dataset}, {job.wildcards.model}")
