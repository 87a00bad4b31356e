rule make_trigger:
    """One trigger per dataset, trigger and seed (the warp grid is drawn from the seed), saved as safetensors."""
    output:
        f"{RESULTS}/{{dataset}}/triggers/{{trigger}}/seed{{seed}}.safetensors",
    params:
        kind=lambda wc: plan.trigger_params(wc.trigger)[0],
        params=lambda wc: plan.trigger_params(wc.trigger)[1],
        trigger_seed=config["attack"]["trigger_seed"],
    log:
        f"{RESULTS}/logs/make_trigger/{{dataset}}/{{trigger}}/seed{{seed}}.log",
    resources:
        runtime=5,
    conda:
        "../envs/pmoe.yaml"
    script:
        "../workflow/scripts/poison/make_trigger.py"


rule clean_training_set:
    """A clean run's training set as a poison record with nothing poisoned (the same record kind for every run)."""
    input:
        data=f"{RESULTS}/data/{{dataset}}.npz",
    output:
        f"{RESULTS}/{{dataset}}/poison/clean.safetensors",
    log:
        f"{RESULTS}/logs/clean_training_set/{{dataset}}.log",
    resources:
        runtime=5,
    conda:
        "../envs/pmoe.yaml"
    script:
        "../workflow/scripts/poison/clean_training_set.py"


rule poison:
    """Choose int(rate*N) training indices with the seed; store the indices and their triggered images."""
    input:
        data=f"{RESULTS}/data/{{dataset}}.npz",
        trigger=f"{RESULTS}/{{dataset}}/triggers/{{trigger}}/seed{{seed}}.safetensors",
    output:
        f"{RESULTS}/{{dataset}}/poison/{{trigger}}-{{rate}}/seed{{seed}}.safetensors",
    params:
        target=TARGET,
        exclude_target=config["attack"]["exclude_target"],
    log:
        f"{RESULTS}/logs/poison/{{dataset}}/{{trigger}}-{{rate}}/seed{{seed}}.log",
    resources:
        runtime=10,
    conda:
        "../envs/pmoe.yaml"
    script:
        "../workflow/scripts/poison/poison.py"
