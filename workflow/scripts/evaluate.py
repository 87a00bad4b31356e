import _src  # noqa: F401  (puts this workflow's src/ first on sys.path)
from pmoe_backdoor.pipeline import log_to, set_threads, evaluate_job

with log_to(snakemake.log[0]):
    set_threads(snakemake.threads)
    w = snakemake.wildcards
    evaluate_job(snakemake.input.data, snakemake.input.weights, snakemake.output[0],
                 trigger_path=snakemake.input.trigger or None, target=snakemake.params.target,
                 batch_size=snakemake.params.batch_size, device=snakemake.params.device,
                 info={"dataset": w.dataset, "model": w.model, "attack": w.attack, "seed": int(w.seed)})
