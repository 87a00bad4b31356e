from pmoe_backdoor.jobs.common import RunId
from pmoe_backdoor.jobs.compression import compression_attack_job
from pmoe_backdoor.runtime import claim_device, log_to, set_threads

with log_to(snakemake.log[0]):
    set_threads(snakemake.threads)
    w, p, out = snakemake.wildcards, snakemake.params, snakemake.output
    with claim_device(p.device, jobs_per_gpu=p.jobs_per_gpu) as device:
        compression_attack_job(snakemake.input.data, dict(p.model), dict(p.attack), dict(p.trigger), int(p.target),
                               calibration=p.calibration, max_fp32_asr=float(p.max_fp32_asr),
                               ba_tolerance=float(p.ba_tolerance), device=device,
                               run=RunId(w.dataset, w.model, w.attack, int(w.seed)), out_weights=out.weights,
                               out_history=out.history, out_trigger=out.trigger)
