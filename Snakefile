# pmoe-backdoor: one DAG from dataset download to the paper's tables and figures.
#   snakemake --cores all                      (a workstation; add --resources gpu=N for N GPUs)
#   snakemake --profile profiles/slurm         (a SLURM cluster, one GPU per training job)
#   snakemake --report reports/report.html     (the report, after a run)

import os
import sys

from snakemake.utils import min_version

min_version("9.0")

# the rules and every job's script use the pmoe_backdoor of this workflow's own src/ (so a conda environment or a
# cluster node needs no installed copy); jobs inherit the environment, hence PYTHONPATH
SRC = f"{workflow.basedir}/src"
sys.path.insert(0, SRC)
os.environ.update(PYTHONPATH=os.pathsep.join(p for p in (SRC, os.environ.get("PYTHONPATH")) if p))


# the paper's study by default (found beside this Snakefile, whatever the working directory); --configfile
# replaces it instead of being merged into it
if not workflow.config_settings.configfiles:

    configfile: f"{workflow.basedir}/config/config.yaml"


from pmoe_backdoor.config_check import validate_config  # noqa: E402  (needs SRC on sys.path)
from pmoe_backdoor.study_checks import check_study  # noqa: E402

# snakemake's validate (which fills in the schema's defaults), but a violation is one line naming the key; then
# the cross-field checks, before the rules are read
if not workflow.modifier.skip_validation:
    validate_config(config, f"{workflow.basedir}/config/schema.yaml")
check_study(config)


report: "reports/workflow.rst"


include: "rules/common.smk"
include: "rules/data.smk"
include: "rules/poison.smk"
include: "rules/train.smk"
include: "rules/evaluate.smk"
include: "rules/defense.smk"
include: "rules/analysis.smk"
include: "rules/deploy.smk"
include: "rules/report.smk"
include: "rules/merging.smk"
include: "rules/compression.smk"
include: "rules/blindspot.smk"


rule all:
    input:
        plan.all_targets(),
    default_target: True


# before the first job (onstart: never in a dry run): on a CPU, how long the trainings about to run take here, and
# the CPU study's command when that is long; it stops nothing (pmoe_backdoor.cpu_estimate)
onstart:
    from snakemake.logging import logger

    from pmoe_backdoor.cpu_estimate import workflow_warning

    message = workflow_warning(workflow, config, plan.dataset_spec, f"{RESULTS}/data")
    if message:
        logger.warning(message)
