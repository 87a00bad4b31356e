from pmoe_backdoor.jobs.analysis import routing_stats_job
from pmoe_backdoor.jobs.common import RunId
from pmoe_backdoor.runtime import log_to, set_threads

with log_to(snakemake.log[0]):
    set_threads(snakemake.threads)
    w = snakemake.wildcards
    routing_stats_job(snakemake.input.data, snakemake.input.weights, dict(snakemake.params.triggers),
                      snakemake.output[0], target=snakemake.params.target, device=snakemake.params.device,
                      run=RunId(w.dataset, w.model, w.attack, int(w.seed)))
