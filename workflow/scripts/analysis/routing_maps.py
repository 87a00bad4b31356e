from pmoe_backdoor.jobs.analysis import patch_map_figure, patch_value_figure, routing_maps_job
from pmoe_backdoor.runtime import log_to

with log_to(snakemake.log[0]):
    w = snakemake.wildcards
    routing_maps_job(snakemake.input.data, dict(snakemake.params.models), list(snakemake.params.classes),
                     snakemake.output.json, device=snakemake.params.device)
    patch_map_figure(snakemake.output.json, snakemake.output.maps, f"Patch routing: {w.dataset}, {w.model}")
    patch_value_figure(snakemake.output.json, snakemake.output.values,
                       f"Patch values received by each expert: {w.dataset}, {w.model}")
