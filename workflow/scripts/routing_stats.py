import _src  # noqa: F401  (puts this workflow's src/ first on sys.path)
from pmoe_backdoor.pipeline import log_to, routing_stats_job, set_threads

with log_to(snakemake.log[0]):
    set_threads(snakemake.threads)
    w = snakemake.wildcards
    routing_stats_job(snakemake.input.data, snakemake.input.weights, dict(snakemake.params.triggers),
                      snakemake.output[0], target=snakemake.params.target, device=snakemake.params.device,
                      info={"dataset": w.dataset, "model": w.model, "attack": w.attack, "seed": int(w.seed)})
