import _src  # noqa: F401  (puts this workflow's src/ first on sys.path)
from pmoe_backdoor.pipeline import log_to, prune_sweep_job, set_threads

with log_to(snakemake.log[0]):
    set_threads(snakemake.threads)
    w = snakemake.wildcards
    prune_sweep_job(snakemake.input.data, snakemake.input.weights, snakemake.input.trigger,
                    snakemake.input.poison, snakemake.output[0], [float(r) for r in snakemake.params.rates],
                    dict(snakemake.params.fine_pruning), int(w.seed), target=snakemake.params.target,
                    device=snakemake.params.device,
                    info={"dataset": w.dataset, "model": w.model, "attack": w.attack, "seed": int(w.seed)})
