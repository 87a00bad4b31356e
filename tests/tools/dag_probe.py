"""Snakemake's view of a workflow without running a job: `python dag_probe.py OUT.json <snakemake args>` builds the
DAG as `snakemake --rulegraph --forceall` would and writes every job (rule, wildcards, params, resources) and every
rule's resources as Snakemake resolved them (`use rule` copies included) to OUT.json."""

import json
import sys

import snakemake.api  # noqa: F401  (before snakemake.dag: importing that first is circular)
import snakemake.dag
from snakemake.cli import main


def plain(value):
    """A params or resources value as JSON (a callable resource, resolved per job, as its name)."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return getattr(value, "__name__", repr(value))


def dump(dag):
    jobs = [{"rule": job.rule.name, "wildcards": dict(job.wildcards_dict), "output": sorted(map(str, job.output)),
             "params": plain({k: job.params[k] for k in job.params.keys()}),
             "resources": plain({k: v for k, v in job.resources.items() if not k.startswith("_")})}
            for job in dag.jobs]
    rules = {rule.name: plain({k: v for k, v in rule.resources.items() if not k.startswith("_")})
             for rule in dag.workflow.rules}
    with open(OUT, "w") as fh:
        json.dump({"jobs": jobs, "rules": rules}, fh)
    return ""


OUT = sys.argv[1]
snakemake.dag.DAG.rule_dot = dump
sys.argv = ["snakemake", *sys.argv[2:], "--rulegraph", "--forceall"]
main()
