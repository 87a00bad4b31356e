from pmoe_backdoor.jobs.merging import defend_merged_job
from pmoe_backdoor.runtime import claim_device, log_to, set_threads

with log_to(snakemake.log[0]):
    set_threads(snakemake.threads)
    w, p, i = snakemake.wildcards, snakemake.params, snakemake.input
    identity = {"dataset": w.dataset, "model": w.model, "set": w.set, "seed": int(w.seed), "coupling": w.coupling}
    with claim_device(p.device, jobs_per_gpu=p.jobs_per_gpu) as device:
        defend_merged_job(i.data, dict(p.triggers), i.merged, i.selection, p.holdout_per_class, p.holdout_seed,
                          list(p.precisions), p.calibration, list(p.prune_rates), dict(p.fine_pruning),
                          dict(p.train), p.target, p.batch_size, device, identity, snakemake.output[0])
