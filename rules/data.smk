# A dataset in the canonical npz, from any source (helpers in common.smk: plan.dataset_input, plan.dataset_spec).


rule prepare_data:
    """Download (torchvision), read (npz, image folder) or generate (synthetic) a dataset into the canonical npz."""
    input:
        data=lambda wc: plan.dataset_input(wc.dataset),
    output:
        f"{RESULTS}/data/{{dataset}}.npz",
    params:
        spec=lambda wc: plan.dataset_spec(wc.dataset),
    log:
        f"{RESULTS}/logs/prepare_data/{{dataset}}.log",
    resources:
        runtime=120,
        mem_mb=8000,
    conda:
        "../envs/pmoe.yaml"
    script:
        "../workflow/scripts/data/prepare_data.py"
