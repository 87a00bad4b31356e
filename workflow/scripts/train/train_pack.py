from pmoe_backdoor.jobs.train import pack_run_files, train_pack_job
from pmoe_backdoor.runtime import claim_device, log_to, set_threads

with log_to(snakemake.log[0]):
    set_threads(snakemake.threads)
    p = snakemake.params
    seeds = [int(s) for s in p.seeds]
    weights, histories = zip(*(pack_run_files(snakemake.output[0], s) for s in seeds))
    with claim_device(p.device, jobs_per_gpu=p.jobs_per_gpu) as device:
        train_pack_job(snakemake.input.data, dict(p.model), dict(p.train), seeds, list(weights), list(histories),
                       list(p.poison), [t or None for t in p.trigger], device=device, probes=p.probes)
