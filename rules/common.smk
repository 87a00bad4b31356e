# Shared by all rules files - the study's plan (pmoe_backdoor.plan decides which jobs exist and what each is given,
# tested without Snakemake), a few globals, the wildcard constraints and the resources of a GPU job.

from pathlib import Path

from snakemake.common.configfile import load_configfile
from snakemake.exceptions import WorkflowError

from pmoe_backdoor.defenses import DEFENSES
from pmoe_backdoor.plan import RESULTS, Plan, canonical


def check_cluster_account():
    """profiles/slurm ships a placeholder account: stop with a clear message before anything is submitted."""
    defaults = workflow.resource_settings.default_resources
    account = defaults.get("slurm_account") if hasattr(defaults, "get") else None
    if account is not None and str(account.raw) == "CHANGE_ME":
        raise WorkflowError(
            "profiles/slurm: slurm_account is still the placeholder CHANGE_ME; set default-resources: "
            "slurm_account in profiles/slurm/config.yaml to your allocation (sacctmgr show assoc user=$USER)"
        )


def config_layers():
    """The config as Snakemake merged it, lowest precedence first, each layer as (the folder its relative paths
    are taken from, its content): the Snakefile's configfile: files, the --configfile files in their order (each
    from its own folder), then --config (from the working directory, where Snakemake runs)."""
    cli = [Path(f).absolute() for f in workflow.config_settings.configfiles]
    directives = [Path(f).absolute() for f in workflow.configfiles]
    if workflow.config_settings.replace_workflow_config:
        directives = []
    files = [f for f in directives if f not in cli] + cli
    layers = [(f.parent, load_configfile(str(f))) for f in files]
    layers.append((Path.cwd(), workflow.config_settings.config))
    return layers


check_cluster_account()
plan = Plan(config, config_layers())

DATASETS = plan.datasets
TRIGGERS = plan.triggers
DEPLOY = config["deployment"]
TARGET = config["attack"]["target"]
DEVICE = config["device"]
JOBS_PER_GPU = config["resources"]["jobs_per_gpu"]
THREADS = config["resources"]["train_threads"]
# a GPU job's resources: one GPU (the workstation's --resources gpu=N and the SLURM profile read it), the training
# runtime and memory of the config; a rule that runs on a GPU uses exactly this block
GPU_JOB = dict(
    gpu=1,
    runtime=config["resources"]["train_runtime_min"],
    mem_mb=config["resources"]["train_mem_mb"],
)


wildcard_constraints:
    dataset="|".join(plan.datasets),
    model="|".join(config["models"]),  # the main study's and those only an extension study uses
    trigger="|".join(plan.all_triggers),  # the main study's and those only a merging set uses
    rate=r"[0-9]+(\.[0-9]+)?",
    attack=r"clean|[A-Za-z0-9_]+-[0-9]+(\.[0-9]+)?",
    seed=r"[0-9]+",
    first=r"[0-9]+",
    last=r"[0-9]+",
    prune=r"[0-9]+(\.[0-9]+)?",
    variant="authors|clean",
    precision="fp32|int8_dynamic|int8|int4",
    victim=r"[A-Za-z0-9_]+",
    replica=r"[0-9]+",
    coupling="free|tied",
    n=r"[0-9]+",
    set=r"[A-Za-z0-9_]+",
    defense="|".join(DEFENSES),
