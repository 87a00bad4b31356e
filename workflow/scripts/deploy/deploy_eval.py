from pmoe_backdoor.jobs.common import RunId
from pmoe_backdoor.jobs.deploy import deploy_eval_job
from pmoe_backdoor.runtime import log_to, set_threads

with log_to(snakemake.log[0]):
    set_threads(snakemake.threads)
    w = snakemake.wildcards
    deploy_eval_job(snakemake.input.data, snakemake.input.weights, list(snakemake.params.precisions),
                    snakemake.output[0], trigger_path=snakemake.input.trigger or None,
                    calibration=snakemake.params.calibration, target=snakemake.params.target,
                    batch_size=snakemake.params.batch_size, device=snakemake.params.device,
                    run=RunId(w.dataset, w.model, w.attack, int(w.seed)),
                    fine_pruned=f"{w.variant} {w.prune} %" if "variant" in w.keys() else None)
