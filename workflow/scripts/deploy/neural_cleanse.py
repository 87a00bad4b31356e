from pmoe_backdoor.jobs.common import RunId
from pmoe_backdoor.jobs.deploy import neural_cleanse_job
from pmoe_backdoor.runtime import claim_device, log_to, set_threads

with log_to(snakemake.log[0]):
    set_threads(snakemake.threads)
    w = snakemake.wildcards
    with claim_device(snakemake.params.device, jobs_per_gpu=snakemake.params.jobs_per_gpu) as device:
        neural_cleanse_job(snakemake.input.data, snakemake.input.weights, w.precision, snakemake.output.summary,
                           snakemake.output.masks, dict(snakemake.params.optimizer), classes=snakemake.params.classes,
                           images=snakemake.params.images, calibration=snakemake.params.calibration,
                           target=snakemake.params.target, device=device,
                           run=RunId(w.dataset, w.model, w.attack, int(w.seed)))
