import _src  # noqa: F401  (puts this workflow's src/ first on sys.path)
from pmoe_backdoor.figures import patch_map_figure, patch_value_figure
from pmoe_backdoor.pipeline import log_to, routing_maps_job

with log_to(snakemake.log[0]):
    w = snakemake.wildcards
    routing_maps_job(snakemake.input.data, dict(snakemake.params.models), list(snakemake.params.classes),
                     snakemake.output.json, device=snakemake.params.device)
    patch_map_figure(snakemake.output.json, snakemake.output.maps, f"Patch routing: {w.dataset}, {w.model}")
    patch_value_figure(snakemake.output.json, snakemake.output.values,
                       f"Patch values received by each expert: {w.dataset}, {w.model}")
