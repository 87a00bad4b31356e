import _src  # noqa: F401  (puts this workflow's src/ first on sys.path)
from pmoe_backdoor.pipeline import deploy_eval_job, log_to, set_threads

with log_to(snakemake.log[0]):
    set_threads(snakemake.threads)
    w = snakemake.wildcards
    info = {"dataset": w.dataset, "model": w.model, "attack": w.attack, "seed": int(w.seed)}
    if "variant" in w.keys():  # a Fine-Pruned model
        info["fine_pruned"] = f"{w.variant} {w.prune} %"
    deploy_eval_job(snakemake.input.data, snakemake.input.weights, list(snakemake.params.precisions),
                    snakemake.output[0],
                    trigger_path=snakemake.input.trigger or None, calibration=snakemake.params.calibration,
                    target=snakemake.params.target, device=snakemake.params.device, info=info)
