"""The rule graph the Snakemake report draws shows each rule once, for the paper's config and the smoke config.

The report keeps one job per rule and per topological level of the job DAG, so a rule whose jobs sit at different
depths is drawn once per depth (clean trainings used to read no data-derived input, so they sat one level above the
attacked ones, and so did everything downstream of them). Computed from a dry DAG: no job runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

if os.environ.get("CI"):
    import snakemake  # noqa: F401
else:
    pytest.importorskip("snakemake", reason="the workflow extra is not installed (pip install -e '.[workflow]')")
pytestmark = pytest.mark.e2e

# `snakemake --rulegraph` with the DAG's rule graph replaced by the report's node list
PROBE = """
import json, sys
import snakemake.api  # before snakemake.dag: importing that first is circular
import snakemake.dag
from snakemake.report.rulegraph_spec import rulegraph_spec

def report_nodes(dag):
    spec, _, _ = rulegraph_spec(dag)
    return "REPORT-RULEGRAPH " + json.dumps([node["rule"] for node in spec["nodes"]])

snakemake.dag.DAG.rule_dot = report_nodes
from snakemake.cli import main
sys.argv = ["snakemake", *sys.argv[1:]]
main()
"""


@pytest.mark.parametrize("configfile", [None, "config/smoke.yaml"], ids=["paper", "smoke"])
def test_report_rule_graph_draws_each_rule_once(tmp_path: Path, configfile: str | None):
    args = ["-s", str(REPO / "Snakefile"), "-d", str(tmp_path), "--rulegraph", "--forceall", "--cores", "1"]
    if configfile:
        args += ["--configfile", str(REPO / configfile)]
    proc = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("REPORT-RULEGRAPH "))
    rules = json.loads(line.split(" ", 1)[1])
    assert {"train_model", "evaluate", "deploy_eval", "precision_table", "config_record", "all"} <= set(rules)
    twice = {rule: n for rule, n in Counter(rules).items() if n > 1}
    assert not twice, f"drawn more than once: {twice}"
