from pmoe_backdoor.jobs.common import RunId
from pmoe_backdoor.jobs.defense import fine_prune_job
from pmoe_backdoor.runtime import claim_device, log_to, set_threads

with log_to(snakemake.log[0]):
    set_threads(snakemake.threads)
    w = snakemake.wildcards
    with claim_device(snakemake.params.device, jobs_per_gpu=snakemake.params.jobs_per_gpu) as device:
        fine_prune_job(snakemake.input.data, snakemake.input.weights, snakemake.input.poison,
                       snakemake.input.trigger, snakemake.output.metrics, snakemake.output.weights,
                       float(w.prune), w.variant, dict(snakemake.params.fine_pruning),
                       dict(snakemake.params.train), target=snakemake.params.target, device=device,
                       run=RunId(w.dataset, w.model, w.attack, int(w.seed)))
