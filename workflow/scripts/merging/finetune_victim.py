from pmoe_backdoor.jobs.merging import finetune_victim_job
from pmoe_backdoor.runtime import claim_device, log_to, set_threads

with log_to(snakemake.log[0]):
    set_threads(snakemake.threads)
    p = snakemake.params
    with claim_device(p.device, jobs_per_gpu=p.jobs_per_gpu) as device:
        finetune_victim_job(snakemake.input.data, snakemake.input.ancestor, snakemake.input.poison, dict(p.finetune),
                            int(p.seed), snakemake.output.weights, snakemake.output.history, device)
