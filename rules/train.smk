# train.pack = 1: one training job per run (train_model). train.pack = K > 1: the seeds of one (dataset, model,
# attack) in groups of K consecutive seeds, one training job per group (train_pack, fit_packed), whose runs then
# appear in their own result folders (train_model links them there), so everything downstream is the same; a change
# to one attack's settings retrains that attack's runs only.


if plan.pack > 1:

    rule train_pack:
        """Train the runs of consecutive seeds first..last of one (dataset, model, attack) as one packed job."""
        input:
            data=f"{RESULTS}/data/{{dataset}}.npz",
            poison=lambda wc: [plan.poison_file(run) for run in plan.pack_runs(wc)],
            trigger=lambda wc: [t for run in plan.pack_runs(wc) if (t := plan.trigger_file(run))],
        output:
            directory(f"{RESULTS}/{{dataset}}/{{model}}/{{attack}}/packs/seeds{{first}}-{{last}}"),
        params:
            seeds=lambda wc: [int(run.seed) for run in plan.pack_runs(wc)],
            poison=lambda wc: [plan.poison_file(run) for run in plan.pack_runs(wc)],
            trigger=lambda wc: [plan.trigger_file(run) or "" for run in plan.pack_runs(wc)],
            model=lambda wc: plan.model_spec(wc.model),
            train=plan.train,
            device=DEVICE,
            jobs_per_gpu=JOBS_PER_GPU,
            probes=config["routing_probes"],
        log:
            f"{RESULTS}/logs/train_model/{{dataset}}/{{model}}/{{attack}}/seeds{{first}}-{{last}}.log",
        benchmark:
            f"{RESULTS}/benchmarks/train_model/{{dataset}}/{{model}}/{{attack}}/seeds{{first}}-{{last}}.tsv"
        threads: THREADS
        resources:
            **{**GPU_JOB, "runtime": lambda wc: GPU_JOB["runtime"] * len(plan.pack_runs(wc))},
        conda:
            "../envs/pmoe.yaml"
        script:
            "../workflow/scripts/train/train_pack.py"

    rule train_model:
        """One run of a packed job in its own result folder (hard links: no copy of the weights)."""
        input:
            plan.pack_of_run,
        output:
            weights=f"{RESULTS}/{{dataset}}/{{model}}/{{attack}}/seed{{seed}}/weights.safetensors",
            history=f"{RESULTS}/{{dataset}}/{{model}}/{{attack}}/seed{{seed}}/history.json",
        log:
            f"{RESULTS}/logs/train_model/{{dataset}}/{{model}}/{{attack}}/seed{{seed}}.log",
        localrule: True
        conda:
            "../envs/pmoe.yaml"
        script:
            "../workflow/scripts/train/link_run.py"

else:

    rule train_model:
        """Train one model: one (dataset, model, attack, seed); attack is 'clean' or '{trigger}-{rate}'."""
        input:
            data=f"{RESULTS}/data/{{dataset}}.npz",
            poison=plan.poison_file,
            trigger=plan.trigger_file,
        output:
            weights=f"{RESULTS}/{{dataset}}/{{model}}/{{attack}}/seed{{seed}}/weights.safetensors",
            history=f"{RESULTS}/{{dataset}}/{{model}}/{{attack}}/seed{{seed}}/history.json",
        params:
            model=lambda wc: plan.model_spec(wc.model),
            train=plan.run_train,
            device=DEVICE,
            jobs_per_gpu=JOBS_PER_GPU,
            probes=config["routing_probes"],
        log:
            f"{RESULTS}/logs/train_model/{{dataset}}/{{model}}/{{attack}}/seed{{seed}}.log",
        benchmark:
            f"{RESULTS}/benchmarks/train_model/{{dataset}}/{{model}}/{{attack}}/seed{{seed}}.tsv"
        threads: THREADS
        resources:
            **GPU_JOB,
        conda:
            "../envs/pmoe.yaml"
        script:
            "../workflow/scripts/train/train_model.py"
