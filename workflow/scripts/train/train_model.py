from pmoe_backdoor.jobs.train import train_job
from pmoe_backdoor.runtime import claim_device, log_to, set_threads

with log_to(snakemake.log[0]):
    set_threads(snakemake.threads)
    with claim_device(snakemake.params.device, jobs_per_gpu=snakemake.params.jobs_per_gpu) as device:
        train_job(snakemake.input.data, dict(snakemake.params.model), dict(snakemake.params.train),
                  int(snakemake.wildcards.seed), snakemake.output.weights, snakemake.output.history,
                  poison_path=snakemake.input.poison or None, trigger_path=snakemake.input.trigger or None,
                  device=device, probes=snakemake.params.probes)
