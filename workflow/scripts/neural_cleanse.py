import _src  # noqa: F401  (puts this workflow's src/ first on sys.path)
from pmoe_backdoor.pipeline import log_to, neural_cleanse_job, set_threads

with log_to(snakemake.log[0]):
    set_threads(snakemake.threads)
    w = snakemake.wildcards
    neural_cleanse_job(snakemake.input.data, snakemake.input.weights, w.precision, snakemake.output.summary,
                       snakemake.output.masks, dict(snakemake.params.optimizer), classes=snakemake.params.classes,
                       images=snakemake.params.images, calibration=snakemake.params.calibration,
                       target=snakemake.params.target, device=snakemake.params.device,
                       info={"dataset": w.dataset, "model": w.model, "attack": w.attack, "seed": int(w.seed)})
