from pmoe_backdoor.jobs.common import RunId
from pmoe_backdoor.jobs.defense import prune_sweep_job
from pmoe_backdoor.runtime import log_to, set_threads

with log_to(snakemake.log[0]):
    set_threads(snakemake.threads)
    w = snakemake.wildcards
    prune_sweep_job(snakemake.input.data, snakemake.input.weights, snakemake.input.trigger,
                    snakemake.input.poison, snakemake.output[0], [float(r) for r in snakemake.params.rates],
                    snakemake.params.activation_data, snakemake.params.activation_images,
                    target=snakemake.params.target, device=snakemake.params.device,
                    run=RunId(w.dataset, w.model, w.attack, int(w.seed)))
