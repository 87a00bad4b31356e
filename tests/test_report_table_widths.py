"""Every table page of the Snakemake report fits a 1280 px browser window: each page is built by its real table
writer from hand-made results as wide as a realistic study makes them (every deployment precision, every trigger,
several rates, seeds and Fine-Pruning rates, mean ± std cells), opened in headless Chromium at 1280 px, and its
rendered width measured.

Needs Chromium and playwright, as tests/test_report_browser.py (whose browser fixture this module reuses)."""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import pytest
import test_report_browser

from pmoe_backdoor.defenses.merging.report import merged_defense_table, merging_table
from pmoe_backdoor.io import write_json
from pmoe_backdoor.reporting.blindspot import blindspot_table
from pmoe_backdoor.reporting.compression import compression_table
from pmoe_backdoor.reporting.summaries import (
    attack_table,
    collect_runs,
    detection_table,
    fine_pruning_table,
    precision_table,
    routing_stats_table,
)

pytestmark = pytest.mark.browser
browser = test_report_browser.browser  # the report test's headless Chromium, skipped or failed as it is there

WINDOW_PX = 1280
REPO = Path(__file__).resolve().parents[1]
DATASET = "cifar10"
PRECISIONS = ["fp32", "int8_dynamic", "int8", "int4"]
TRIGGERS = ["square", "blend", "warped"]
RATES = [0.1, 0.5, 2, 6, 10]  # the full study's poisoning rates
DEFENSE_RATES = [2, 10]  # the defenses run on a subset of them
PRUNE_RATES = [10, 20, 30]
SEEDS = [0, 1, 2]
VICTIM_SETS = ["square_blend", "square_warped", "blend_warped", "benign_square", "benign_blend", "benign_warped",
               "collusive"]


def _attacks(rates) -> list[str]:
    return ["clean"] + [f"{t}-{r:g}" for t in TRIGGERS for r in rates]


class Results:
    """Hand-made result files under one folder, with percentages drawn at random (their digits, not their values,
    set the widths)."""

    def __init__(self, root: Path):
        self.root, self.rng, self.count = root, np.random.default_rng(0), 0

    def pct(self) -> float:
        return float(self.rng.uniform(0, 100))

    def write(self, obj, name: str | None = None) -> str:
        self.count += 1
        path = self.root / (name or f"r{self.count}.json")
        write_json(path, obj)
        return str(path)


def runs_and_attacks(res: Results, out: Path) -> None:
    # the workflow's own relative paths: the runs table shows them in a column
    paths = [res.write({"dataset": DATASET, "model": "pmoe", "attack": a, "seed": s, "ba": res.pct(),
                        "test_loss": float(res.rng.uniform(0.3, 2.5)), **({} if a == "clean" else {"asr": res.pct()})},
                       f"results/{DATASET}/pmoe/{a}/seed{s}/metrics.json")
             for a in _attacks(RATES) for s in range(5)]
    with contextlib.chdir(res.root):
        collect_runs([str(Path(p).relative_to(res.root)) for p in paths], str(out / "runs.csv"), str(out / "runs.html"))
    attack_table(str(out / "runs.csv"), str(REPO / "config" / "paper-tables-1-2.csv"), DATASET, DATASET,
                 *(str(out / f"attacks.{e}") for e in ("csv", "md", "tex", "html")))


def fine_pruning(res: Results, out: Path) -> None:
    stage = lambda: {"ca": res.pct(), "asr": res.pct()}  # noqa: E731
    paths = [res.write({"dataset": DATASET, "model": "pmoe", "attack": "square-2", "seed": s, "prune_rate": rate,
                        "finetune_data": data, "mask": mask, "before": stage(), "after_pruning": stage(),
                        "after_finetuning": stage()})
             for data in ("authors", "clean") for mask in (False, True) for rate in PRUNE_RATES for s in SEEDS]
    fine_pruning_table(paths, *(str(out / f"fine_pruning.{e}") for e in ("csv", "md", "tex")),
                       str(REPO / "config" / "paper-table-3.csv"), {DATASET: DATASET}, str(out / "fine_pruning.html"))


def _deployed(res: Results, attack: str, seed: int, **extra) -> list[dict]:
    return [{"dataset": DATASET, "model": "pmoe", "attack": attack, "seed": seed, "precision": p, "ba": res.pct(),
             "test_loss": 1.0, "routing_change_clean": res.pct() / 100, "routing_change_triggered": res.pct() / 100,
             **({} if attack == "clean" else {"asr": res.pct()}), **extra} for p in PRECISIONS]


def precision(res: Results, out: Path) -> None:
    paths = [res.write(_deployed(res, a, s)) for a in _attacks(RATES) for s in SEEDS]
    paths += [res.write(_deployed(res, "square-2", s, fine_pruned=f"{data} 30 %"))
              for data in ("authors", "clean") for s in SEEDS]
    precision_table(paths, *(str(out / f"precision.{e}") for e in ("csv", "md", "tex", "html")))


def detection(res: Results, out: Path) -> None:
    def summary(attack, seed, p):
        classes = [{"class": c, "l1": float(res.rng.uniform(5, 200))} for c in range(10)]
        return {"dataset": DATASET, "model": "pmoe", "attack": attack, "seed": seed, "precision": p, "target": 0,
                "classes": classes, "anomaly_index": list(res.rng.uniform(0, 4, 10)), "flagged": bool(seed % 2),
                "detected_target": bool(seed % 2), "seconds": float(res.rng.uniform(100, 5000))}

    paths = [res.write(summary(a, s, p)) for a in _attacks(DEFENSE_RATES) for s in SEEDS[:2] for p in PRECISIONS]
    detection_table(paths, *(str(out / f"detection.{e}") for e in ("csv", "md", "tex", "html")))


def routing(res: Results, out: Path) -> None:
    def images():
        return {"reached_fraction": res.pct() / 100, "mean_experts": float(res.rng.uniform(0, 4)),
                "per_expert_fraction": list(res.rng.uniform(0, 1, 4))}

    paths = [res.write({"dataset": DATASET, "model": "pmoe", "attack": a, "seed": s,
                        "triggers": {"square": {"triggered": images(), "untriggered": images()}}})
             for a in ["clean"] + [f"square-{r:g}" for r in RATES] for s in SEEDS]
    routing_stats_table(paths, *(str(out / f"routing.{e}") for e in ("csv", "md", "tex", "html")))


def blindspot(res: Results, out: Path) -> None:
    """The widest realistic case: four precisions, three triggers, two rates, every defense."""
    def run(attack, seed, p):
        return {"dataset": DATASET, "model": "pmoe", "attack": attack, "seed": seed, "precision": p, "target": 0}

    defenses, deployed, fine_pruned = [], [], []
    for a in _attacks(DEFENSE_RATES):
        for s in SEEDS[:2]:
            for p in PRECISIONS:
                flag = bool(res.rng.integers(2))
                found = None if a == "clean" else flag
                defenses += [res.write({**run(a, s, p), "defense_name": "neural_cleanse", "flagged": flag,
                                        "detected_target": flag, "target_found": found}),
                             res.write({**run(a, s, p), "defense_name": "strip", "flagged": flag,
                                        "target_found": None})]
                defenses += [res.write({**run(a, s, p), "defense_name": d, "flagged": flag,
                                        "flagged_labels": [0, 3] if flag else [], "target_found": found})
                             for d in ("activation_clustering", "spectral_signatures")]
                if a != "clean":
                    defenses.append(res.write({**run(a, s, p), "defense_name": "fine_tuning", "flagged": flag,
                                               "target_found": None, "asr_after": 5.0 if flag else 95.0}))
            deployed.append(res.write(_deployed(res, a, s)))
            if a != "clean":
                fine_pruned.append(res.write(_deployed(res, a, s, fine_pruned="clean 30 %")))
    blindspot_table(defenses, deployed, fine_pruned, 20.0, DATASET,
                    *(str(out / f"blindspot.{e}") for e in ("csv", "md", "tex", "html")))


def compression(res: Results, out: Path) -> None:
    def ba_asr():
        return {"ba": res.pct(), "asr": res.pct()}

    evaluations, nc = [], []
    for variant, bits in (("faithful", 4), ("faithful", 8), ("matched", 8), ("prune", 8), ("prune_unknown", 8)):
        ident = {"dataset": DATASET, "model": "preact_resnet18", "attack": f"{variant}{bits}bit-1", "seed": 0}
        evaluations.append(res.write({
            **ident, "variant": variant, "bits": bits, "target": 1, "chosen_epoch": 35, "rule_met": variant != "prune",
            "fp32": ba_asr(), "int4": ba_asr(), "trained_bits": ba_asr(),
            **{n: {**ba_asr(), "routing_flip_triggered": res.pct() / 100} for n in ("int8_faithful", "int8_matched")},
            "fine_pruning": [{"rate": r, "pruned": ba_asr(), "finetuned": ba_asr()} for r in PRUNE_RATES]}))
        nc.append(res.write({**ident, "max_low_anomaly_index": float(res.rng.uniform(0, 4)), "flagged": True,
                             "flagged_class": 1}))
    clean_nc = [res.write({"dataset": DATASET, "max_low_anomaly_index": float(res.rng.uniform(0, 4))})
                for _ in range(3)]
    compression_table(evaluations, nc, clean_nc, *(str(out / f"compression.{e}") for e in ("csv", "md", "tex", "html")))


def merging(res: Results, out: Path) -> None:
    def ba_asr():
        return {"ba": res.pct(), "mean_asr": res.pct()}

    ident = lambda name, seed, coupling: {"dataset": DATASET, "model": "pmoe", "set": name, "seed": seed,  # noqa: E731
                                          "coupling": coupling}
    selections, defended = [], []
    for name in VICTIM_SETS:
        for coupling in ("free", "tied"):
            for s in SEEDS:
                selections.append(res.write({
                    **ident(name, s, coupling), "victims": ["square", "blend"], "oracle": "M_01", "chosen": "M_10",
                    "selected_is_oracle": False, "selection": {"suspect_class": 0},
                    "models": {n: ba_asr() for n in ("square", "blend", "WAG", "M_01", "M_10")}}))
                defended.append(res.write({
                    **ident(name, s, coupling), "fine_pruning": {"images": 500},
                    "models": {m: {"precisions": {p: ba_asr() for p in ("fp32", "int8", "int4")},
                                   "fine_pruning": [{"prune_rate": r, "after_pruning": ba_asr(),
                                                     "after_finetuning": ba_asr()} for r in PRUNE_RATES]}
                               for m in ("WAG", "MSD (selected)")}}))
    merging_table(selections, 0, *(str(out / f"merging.{e}") for e in ("csv", "md", "tex", "html")))
    merged_defense_table(defended, *(str(out / f"merged_defense.{e}") for e in ("csv", "md", "tex", "html")))


PAGES = ["runs", "attacks", "fine_pruning", "precision", "detection", "routing", "blindspot", "compression", "merging",
         "merged_defense"]


@pytest.fixture(scope="module")
def pages(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("table-pages")
    res = Results(tmp_path_factory.mktemp("results"))
    for write in (runs_and_attacks, fine_pruning, precision, detection, routing, blindspot, compression, merging):
        write(res, out)
    assert {p.stem for p in out.glob("*.html")} == set(PAGES)
    return out


def rendered_width(chromium, page_path: Path) -> int:
    """The page's width in a 1280 px window: its scroll width, which grows past the window when content overflows."""
    page = chromium.new_page(viewport={"width": WINDOW_PX, "height": 900})
    try:
        page.goto(page_path.as_uri())
        page.locator("table tbody tr").first.wait_for()
        return page.evaluate("() => Math.max(document.documentElement.scrollWidth, document.body.scrollWidth)")
    finally:
        page.close()


@pytest.mark.parametrize("name", PAGES)
def test_table_page_fits_a_1280_px_window(browser, pages: Path, name: str):
    width = rendered_width(browser, pages / f"{name}.html")
    assert width <= WINDOW_PX, f"{name}.html is {width} px wide in a {WINDOW_PX} px window"
