from pmoe_backdoor.jobs.blindspot import strip_job
from pmoe_backdoor.jobs.common import RunId
from pmoe_backdoor.runtime import claim_device, log_to, set_threads

with log_to(snakemake.log[0]):
    set_threads(snakemake.threads)
    w, p = snakemake.wildcards, snakemake.params
    with claim_device(p.device, jobs_per_gpu=p.jobs_per_gpu) as device:
        strip_job(snakemake.input.data, snakemake.input.weights, w.precision, dict(p.triggers), snakemake.output[0],
                  dict(p.strip), calibration=p.calibration, target=p.target, device=device,
                  run=RunId(w.dataset, w.model, w.attack, int(w.seed)))
