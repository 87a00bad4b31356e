from pmoe_backdoor.jobs.common import RunId
from pmoe_backdoor.jobs.compression import compression_eval_job
from pmoe_backdoor.runtime import claim_device, log_to, set_threads

with log_to(snakemake.log[0]):
    set_threads(snakemake.threads)
    w, p, i = snakemake.wildcards, snakemake.params, snakemake.input
    with claim_device(p.device, jobs_per_gpu=p.jobs_per_gpu) as device:
        compression_eval_job(i.data, i.weights, i.trigger, i.history, int(p.target), calibration=p.calibration,
                             fp_cfg=dict(p.fine_pruning), finetune_cfg=dict(p.finetune), batch_size=p.batch_size,
                             device=device, run=RunId(w.dataset, w.model, w.attack, int(w.seed)),
                             out=snakemake.output[0])
