from pmoe_backdoor.jobs.merging import select_candidate_job
from pmoe_backdoor.runtime import claim_device, log_to, set_threads

with log_to(snakemake.log[0]):
    set_threads(snakemake.threads)
    w, p = snakemake.wildcards, snakemake.params
    identity = {"dataset": w.dataset, "model": w.model, "set": w.set, "seed": int(w.seed), "coupling": w.coupling}
    with claim_device(p.device, jobs_per_gpu=p.jobs_per_gpu) as device:
        select_candidate_job(snakemake.input.data, dict(zip(p.labels, snakemake.input.victims)), dict(p.triggers),
                             snakemake.input.merged, p.holdout_per_class, p.holdout_seed, dict(p.inversion), p.target,
                             p.batch_size, device, identity, snakemake.output[0])
