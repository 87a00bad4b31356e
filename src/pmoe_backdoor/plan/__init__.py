"""The study a validated config describes: its runs, defense applications and tables, as paths and params.

The Snakefile builds one :class:`Plan` from the config (after ``config_check``) and its rules ask it for their
inputs, targets and parameters; nothing here imports Snakemake or torch, so every decision about *which* jobs exist
and *what* each one is given is unit-tested in plain Python (tests/test_plan.py).

Functions that take ``wc`` accept Snakemake's wildcards or anything with the same attributes (``dataset``, ``model``,
``attack``, ``seed``, ...). Paths are relative to the working directory, under ``results/``.
"""

from __future__ import annotations

from .common import RESULTS, DefenseApplication, Run, canonical, table_files
from .compression import CompressionPlan
from .extensions import AnalysisPlan, BlindspotPlan, MergingPlan
from .study import StudyPlan

__all__ = ["RESULTS", "DefenseApplication", "Plan", "Run", "canonical"]


class Plan(StudyPlan, AnalysisPlan, MergingPlan, CompressionPlan, BlindspotPlan):
    """Everything the workflow derives from one validated config (defaults already filled in by the schema)."""

    # ----- what `snakemake` builds by default -----

    def report_targets(self) -> list[str]:
        targets = [f"{RESULTS}/tables/runs_{d}.csv" for d in self.datasets] + [f"{RESULTS}/figures/asr_ba_vs_rate.png"]
        targets += [f for d in self.datasets for f in table_files(f"attacks_{d}")]
        if self.fp["enabled"]:
            targets += table_files("fine_pruning")
            if self.fp.get("sweep"):
                targets.append(f"{RESULTS}/figures/prune_sweep.png")
        return targets

    def analysis_targets(self) -> list[str]:
        if self.analysis is None:
            return []
        routed = self.routed_models()
        targets = [f"{RESULTS}/figures/trigger_examples_{d}.png" for d in self.datasets]
        for d in self.datasets:
            for m in routed:
                targets += [f"{RESULTS}/figures/patch_maps_{d}_{m}.png", f"{RESULTS}/figures/patch_values_{d}_{m}.png"]
            if routed and self.located_triggers():
                targets += table_files(f"routing_{d}")
                targets.append(f"{RESULTS}/figures/routing_{d}.png")
        if self.fp["enabled"]:
            targets += [f"{RESULTS}/figures/fineprune_patch_maps_{d}_{m}.png"
                        for d in self.fp["datasets"] for m in self.fp["models"]]
        return targets

    def beyond_targets(self) -> list[str]:
        targets = []
        for d in self.datasets:
            if self.deploy["precisions"]:
                targets += table_files(f"precision_{d}")
            if self.nc["enabled"]:
                targets += table_files(f"detection_{d}")
                targets.append(f"{RESULTS}/figures/nc_masks_{d}.png")
        return targets

    def merging_targets(self) -> list[str]:
        if not self.merge["enabled"]:
            return []
        tables = ["merging"] + (["merged_defense"] if self.defended_sets() else [])
        targets = [f for t in tables for d in self.merge["datasets"] for f in table_files(f"{t}_{d}")]
        return targets + [f"{RESULTS}/figures/msd_strategies.png"]

    def compression_targets(self) -> list[str]:
        if not self.compress["enabled"]:
            return []
        return [f for d in self.compress["datasets"] for f in table_files(f"compression_{d}")]

    def blindspot_targets(self) -> list[str]:
        if not self.blind["enabled"]:
            return []
        return [f for d in self.datasets for f in table_files(f"blindspot_{d}")] + [
            f"{RESULTS}/figures/blindspot_{d}.png" for d in self.datasets
        ] + [f"{RESULTS}/figures/localisation_{d}.png" for d in self.datasets if self.localisation_entries(d)]

    def all_targets(self) -> list[str]:
        targets = (self.report_targets() + self.analysis_targets() + self.beyond_targets() + self.merging_targets()
                   + self.compression_targets() + self.blindspot_targets())
        # what the report shows besides figures: each table's HTML page (from the table's own job), the config
        tables = [t for t in targets if t.startswith(f"{RESULTS}/tables/") and t.endswith((".md", ".csv"))]
        pages = dict.fromkeys(t.rsplit(".", 1)[0] + ".html" for t in tables)
        return targets + list(pages) + [f"{RESULTS}/config/config.html"]

    def training_jobs(self) -> int:
        """How many models the study trains: the main runs, the merging victims and the compression attacks."""
        victims = sum(len(self.merge["sets"][s]) for s in self.merge["sets"]) * self.merge["seeds"] * len(
            self.merge["datasets"]) if self.merge["enabled"] else 0
        return len(self.runs()) + victims + sum(len(self.compression_runs(d)) for d in self.datasets)

