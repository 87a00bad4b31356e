import _src  # noqa: F401  (puts this workflow's src/ first on sys.path)
from pmoe_backdoor.pipeline import claim_device, fine_prune_job, log_to, set_threads

with log_to(snakemake.log[0]):
    set_threads(snakemake.threads)
    w = snakemake.wildcards
    with claim_device(snakemake.params.device) as device:
        fine_prune_job(snakemake.input.data, snakemake.input.weights, snakemake.input.poison,
                       snakemake.input.trigger, snakemake.output.metrics, snakemake.output.weights,
                       float(w.prune), w.variant, dict(snakemake.params.fine_pruning),
                       dict(snakemake.params.train), int(w.seed),
                       target=snakemake.params.target, device=device,
                       info={"dataset": w.dataset, "model": w.model, "attack": w.attack, "seed": int(w.seed)})
