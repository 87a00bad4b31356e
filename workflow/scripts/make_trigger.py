import _src  # noqa: F401  (puts this workflow's src/ first on sys.path)
from pmoe_backdoor.pipeline import derived_seed, log_to, make_trigger_file

with log_to(snakemake.log[0]):
    seed = derived_seed(snakemake.params.trigger_seed, "blend")
    if snakemake.params.kind == "warp":  # the authors drew a new warp grid in every run
        seed = derived_seed(int(snakemake.wildcards.seed), "warp")
    make_trigger_file(snakemake.params.kind, dict(snakemake.params.params), seed, snakemake.output[0])
