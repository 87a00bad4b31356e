rule prepare_data:
    """Download (torchvision), read (npz) or generate (synthetic) a dataset into the canonical npz."""
    output:
        f"{RESULTS}/data/{{dataset}}.npz",
    params:
        spec=lambda wc: canonical(config["datasets"][wc.dataset]),
    log:
        f"{RESULTS}/logs/prepare_data/{{dataset}}.log",
    resources:
        runtime=120,
        mem_mb=8000,
    conda:
        "../envs/pmoe.yaml"
    script:
        "../workflow/scripts/data/prepare_data.py"
