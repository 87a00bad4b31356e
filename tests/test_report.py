"""Tests of pmoe_backdoor.reporting.summaries (tables) and the figure writers, on small hand-made metrics files."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pmoe_backdoor.io import write_json
from pmoe_backdoor.reporting.figures import attack_figure
from pmoe_backdoor.reporting.summaries import (
    attack_table,
    cad_std,
    collect_runs,
    detection_table,
    fine_pruning_table,
    precision_table,
    summarise_attacks,
)

SQRT2 = math.sqrt(2)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _metric(dataset, model, attack, seed, ba, asr=None):
    m = {"dataset": dataset, "model": model, "attack": attack, "seed": seed, "ba": ba, "test_loss": 1.0 + seed}
    if asr is not None:
        m["asr"] = asr
    return m


RUNS = [
    _metric("c10", "pmoe", "clean", 0, 80.0),
    _metric("c10", "pmoe", "clean", 1, 82.0),
    _metric("c10", "pmoe", "square-2", 0, 78.0, 90.0),
    _metric("c10", "pmoe", "square-2", 1, 80.0, 100.0),
    _metric("c10", "wrn", "clean", 0, 70.0),
    _metric("c10", "wrn", "square-2", 0, 65.0, 50.0),
    _metric("gtsrb", "pmoe", "clean", 0, 50.0),          # another dataset: must not enter c10's table
    _metric("gtsrb", "pmoe", "square-2", 0, 40.0, 10.0),
]

PAPER_CSV = """table,dataset,trigger,poison_rate_percent,asr,ba,cad
1,cifar10,square,0.5,90.7,83.5,1.5
1,cifar10,square,2,97.0,83.0,1.5
1,cifar10,blend,2,99.0,82.0,2.0
1,gtsrb,square,2,11.0,12.0,13.0
"""


@pytest.fixture()
def runs(tmp_path):
    paths = []
    for i, m in enumerate(RUNS):
        p = tmp_path / "metrics" / f"run{i}.json"
        write_json(p, m)
        paths.append(str(p))
    out = tmp_path / "runs.csv"
    df = collect_runs(paths, str(out))
    paper = tmp_path / "paper.csv"
    paper.write_text(PAPER_CSV)
    return df, out, paper


def test_collect_runs(runs):
    df, out, _ = runs
    assert len(df) == len(RUNS)
    back = pd.read_csv(out)
    assert list(back.columns) == ["dataset", "model", "attack", "trigger", "rate", "seed", "ba", "asr", "test_loss",
                                  "path"]
    r = back.iloc[2]
    assert (r.trigger, r.rate, r.seed, r.ba, r.asr) == ("square", 2.0, 0, 78.0, 90.0)
    assert (back.iloc[0].trigger, back.iloc[0].rate) == ("clean", 0.0)
    assert np.isnan(back.iloc[0].asr)


def _row(table: pd.DataFrame, model: str, trigger: str) -> pd.Series:
    hit = table[(table.model == model) & (table.trigger == trigger)]
    assert len(hit) == 1
    return hit.iloc[0]


def test_summarise_attacks_means_cad_and_paper(runs):
    df, _, paper = runs
    table = summarise_attacks(df, pd.read_csv(paper), "c10", "cifar10")
    assert list(zip(table.model, table.trigger)) == [("pmoe", "clean"), ("pmoe", "square"), ("wrn", "clean"),
                                                     ("wrn", "square")]
    clean = _row(table, "pmoe", "clean")
    assert clean.ba_mean == pytest.approx(81.0)  # the clean accuracy (CA)
    assert clean.ba_std == pytest.approx(SQRT2)
    assert clean.seeds == 2
    assert np.isnan(clean.cad_mean)

    sq = _row(table, "pmoe", "square")
    assert sq.seeds == 2 and sq.rate == 2.0
    assert sq.ba_mean == pytest.approx(79.0)
    assert sq.cad_mean == pytest.approx(2.0)  # 81 - 79
    assert sq.asr_mean == pytest.approx(95.0)
    assert sq.asr_std == pytest.approx(7.0711, abs=1e-4)  # sample std of 90 and 100
    assert sq.paper_asr == 97.0 and sq.paper_ba == 83.0 and sq.paper_cad == 1.5
    assert sq.diff_asr == pytest.approx(95.0 - 97.0)
    assert sq.diff_ba == pytest.approx(79.0 - 83.0)
    assert sq.diff_cad == pytest.approx(2.0 - 1.5)

    wrn = _row(table, "wrn", "square")
    assert wrn.cad_mean == pytest.approx(70.0 - 65.0)  # against wrn's own clean accuracy
    assert np.isnan(wrn.asr_std)  # one seed


def test_summarise_attacks_without_paper_or_match(runs):
    df, _, paper = runs
    table = summarise_attacks(df, None, "c10", "cifar10")
    assert "paper_asr" not in table.columns
    table = summarise_attacks(df, pd.read_csv(paper), "c10", "svhn")  # no paper row for this name
    assert np.isnan(_row(table, "pmoe", "square").paper_asr)
    g = summarise_attacks(df, pd.read_csv(paper), "gtsrb", "gtsrb")
    assert _row(g, "pmoe", "square").paper_asr == 11.0
    assert _row(g, "pmoe", "square").cad_mean == pytest.approx(10.0)


def test_cad_std_combines_clean_and_attack_spreads():
    rows = [("a", "clean", [80, 82, 84]), ("a", "square-2", [70, 73]),  # var 4 and 4.5
            ("b", "clean", [90]), ("b", "square-2", [80, 86]),          # one clean seed: BA's var 18 alone
            ("c", "clean", [60, 64]), ("c", "square-2", [50]),          # one attack seed: CA's var 8 alone
            ("d", "clean", [60]), ("d", "square-2", [50]),              # neither: nan
            ("e", "square-2", [50, 52])]                                 # no clean run: no CAD
    df = pd.DataFrame([{"dataset": "c10", "model": m, "attack": a, "trigger": a.split("-")[0],
                        "rate": 0.0 if a == "clean" else 2.0, "seed": s, "ba": ba, "asr": np.nan}
                       for m, a, bas in rows for s, ba in enumerate(bas)])
    table = summarise_attacks(df, None, "c10", "cifar10")
    a = _row(table, "a", "square")
    assert a.cad_mean == pytest.approx(82 - 71.5)
    assert a.cad_std == pytest.approx(math.sqrt(8.5)) and a.cad_std == pytest.approx(2.9155, abs=1e-4)
    assert _row(table, "b", "square").cad_std == pytest.approx(math.sqrt(18))
    assert _row(table, "c", "square").cad_std == pytest.approx(math.sqrt(8))
    assert np.isnan(_row(table, "d", "square").cad_std) and _row(table, "d", "square").cad_mean == 10
    e = _row(table, "e", "square")
    assert np.isnan(e.cad_mean) and np.isnan(e.cad_std) and e.ba_std == pytest.approx(SQRT2)
    assert np.isnan(_row(table, "a", "clean").cad_std)
    assert cad_std(pd.Series([1.0, 3.0]), pd.Series([2.0, 4.0, 6.0])) == pytest.approx(math.sqrt(2 + 4))


def _md_rows(path: Path) -> tuple[list[str], list[list[str]]]:
    lines = [ln for ln in path.read_text().splitlines() if ln.startswith("|")]
    cells = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines]
    assert set(lines[1]) <= set("|-")  # the separator row
    return cells[0], cells[2:]


def test_attack_table_outputs(runs, tmp_path):
    _, runs_csv, paper = runs
    out = tmp_path / "tables"
    table = attack_table(str(runs_csv), str(paper), "c10", "cifar10", str(out / "t.csv"), str(out / "t.md"),
                         str(out / "t.tex"))
    csv = pd.read_csv(out / "t.csv")
    assert len(csv) == len(table) == 4
    assert csv.asr_mean.iloc[1] == pytest.approx(95.0)

    header, rows = _md_rows(out / "t.md")
    assert header[:5] == ["Model", "Trigger", "Rate %", "Seeds", "ASR %"]
    assert len(rows) == 4 and all(len(r) == len(header) for r in rows)
    assert rows[0] == ["pmoe", "clean", "–", "2", "–", "–", "–", "81.0 ± 1.4", "–", "–", "–", "–", "–"]
    assert rows[1] == ["pmoe", "square", "2", "2", "95.0 ± 7.1", "97.0", "-2.0", "79.0 ± 1.4", "83.0", "-4.0",
                       "2.0 ± 2.0", "1.5", "+0.5"]  # CAD ± sqrt(2 + 2): CA's and BA's variances
    assert rows[3][:5] == ["wrn", "square", "2", "1", "50.0"]  # one seed: no ± std

    tex = (out / "t.tex").read_text()
    assert "\\begin{tabular}{ll" + "r" * 11 + "}" in tex and "\\end{tabular}" in tex
    assert "Rate \\%" in tex and "ASR \\%" in tex
    assert not re.search(r"(?<!\\)%", tex)  # every % is escaped
    assert "95.0 $\\pm$ 7.1" in tex
    assert sum(ln.endswith("\\\\") for ln in tex.splitlines()) == 1 + 4  # header and one line per row


def test_attack_table_without_paper(runs, tmp_path):
    _, runs_csv, _ = runs
    attack_table(str(runs_csv), str(tmp_path / "missing.csv"), "c10", "cifar10", str(tmp_path / "t.csv"),
                 str(tmp_path / "t.md"), str(tmp_path / "t.tex"))
    _, rows = _md_rows(tmp_path / "t.md")
    assert rows[1][4:7] == ["95.0 ± 7.1", "–", "–"]


# ----------------------------------------------------------------------------------------------------------
# Fine-Pruning table
# ----------------------------------------------------------------------------------------------------------

PAPER3_CSV = ("dataset,trigger,poison_rate_percent,prune_rate,before_ca,before_asr,after_pruning_ca,"
              "after_pruning_asr,after_finetuning_ca,after_finetuning_asr,note\n") + """\
cifar10,square,2,10,84.9,,80.1,94.2,,,"a note, with a comma"
cifar10,square,2,20,,,78.9,95.2,,,
gtsrb,square,2,30,1.0,2.0,3.0,4.0,5.0,6.0,
"""


def _fp(seed, rate, mask, before, pruned, tuned):
    return {"dataset": "c10", "model": "pmoe", "attack": "square-2", "seed": seed, "prune_rate": rate,
            "finetune_data": "authors", "mask": mask, "pruned_channels": [[0], [1], [2], [3]],
            "before": dict(zip(("ca", "asr"), before)), "after_pruning": dict(zip(("ca", "asr"), pruned)),
            "after_finetuning": dict(zip(("ca", "asr"), tuned))}


def test_fine_pruning_table(tmp_path):
    runs = [_fp(0, 10, False, (84, 96), (80, 91), (83, 2)),
            _fp(1, 10, False, (86, 98), (78, 93), (81, 4)),
            _fp(0, 30, True, (85, 97), (70, 50), (82, 1))]
    paths = []
    for i, m in enumerate(runs):
        write_json(tmp_path / f"fp{i}.json", m)
        paths.append(str(tmp_path / f"fp{i}.json"))
    (tmp_path / "paper3.csv").write_text(PAPER3_CSV)
    s = fine_pruning_table(paths, str(tmp_path / "fp.csv"), str(tmp_path / "fp.md"), str(tmp_path / "fp.tex"),
                           str(tmp_path / "paper3.csv"), {"c10": "cifar10"})
    assert len(s) == 2
    a = s[s.prune_rate == 10].iloc[0]
    assert a.runs == 2
    expected = {"before_ca": 85, "before_asr": 97, "after_pruning_ca": 79, "after_pruning_asr": 92,
                "after_finetuning_ca": 82, "after_finetuning_asr": 3}
    for col, value in expected.items():
        assert a[f"{col}_mean"] == pytest.approx(value), col
        assert a[f"{col}_std"] == pytest.approx(SQRT2), col
    assert a.paper_before_ca == 84.9 and a.paper_after_pruning_ca == 80.1 and a.paper_after_pruning_asr == 94.2
    assert np.isnan(a.paper_before_asr) and np.isnan(a.paper_after_finetuning_asr)
    b = s[s.prune_rate == 30].iloc[0]
    assert b.runs == 1 and bool(b["mask"]) is True
    assert b.after_pruning_asr_mean == 50
    assert all(np.isnan(b[f"paper_{c}"]) for c in expected)  # only gtsrb has a 30 % row

    header, rows = _md_rows(tmp_path / "fp.md")
    assert header[:6] == ["Dataset", "Model", "Attack", "Fine-tune data", "Pruned %", "Runs"]
    assert rows[0] == ["c10", "pmoe", "square-2", "authors", "10", "2", "85.0 ± 1.4 [84.9]", "97.0 ± 1.4",
                       "79.0 ± 1.4 [80.1]", "92.0 ± 1.4 [94.2]", "82.0 ± 1.4", "3.0 ± 1.4"]
    assert rows[1] == ["c10", "pmoe", "square-2", "authors (masked)", "30", "1", "85.0", "97.0", "70.0", "50.0",
                       "82.0", "1.0"]
    assert len(pd.read_csv(tmp_path / "fp.csv")) == 2
    tex = (tmp_path / "fp.tex").read_text()
    assert "\\begin{tabular}" in tex and not re.search(r"(?<!\\)%", tex)


def test_fine_pruning_table_without_paper(tmp_path):
    write_json(tmp_path / "fp.json", _fp(0, 10, False, (84, 96), (80, 90), (83, 2)))
    s = fine_pruning_table([str(tmp_path / "fp.json")], str(tmp_path / "fp.csv"), str(tmp_path / "fp.md"),
                           str(tmp_path / "fp.tex"))
    assert np.isnan(s.paper_before_ca.iloc[0])
    _, rows = _md_rows(tmp_path / "fp.md")
    assert "[" not in " ".join(rows[0])


# ----------------------------------------------------------------------------------------------------------
# precision and detection tables
# ----------------------------------------------------------------------------------------------------------

def _dep(attack, seed, precision, ba, asr=None, rcc=None, rct=None, **extra):
    d = {"dataset": "c10", "model": "pmoe", "attack": attack, "seed": seed, "precision": precision, "ba": ba,
         "test_loss": 1.0, **extra}
    for k, v in (("asr", asr), ("routing_change_clean", rcc), ("routing_change_triggered", rct)):
        if v is not None:
            d[k] = v
    return d


def test_precision_table(tmp_path):
    files = {
        "d0": [_dep("square-2", 0, "fp32", 80, 90, 0.0, 0.0), _dep("square-2", 0, "int8", 79, 88, 0.05, 0.1),
               _dep("square-2", 0, "int4", 70, 60, 0.2, 0.3)],
        "d1": [_dep("square-2", 1, "fp32", 82, 100, 0.0, 0.0), _dep("square-2", 1, "int8", 81, 96, 0.07, 0.2),
               _dep("square-2", 1, "int4", 74, 80, 0.3, 0.5)],
        "clean": [_dep("clean", 0, "fp32", 85, rcc=0.0), _dep("clean", 0, "int8", 84, rcc=0.04)],
        "fp": [_dep("square-2", 0, "fp32", 83, 3, 0.0, 0.0, fine_pruned=10),
               _dep("square-2", 0, "int8", 82, 5, 0.1, 0.15, fine_pruned=10)],
    }
    paths = []
    for name, rows in files.items():
        write_json(tmp_path / f"{name}.json", rows)
        paths.append(str(tmp_path / f"{name}.json"))
    s = precision_table(paths, str(tmp_path / "p.csv"), str(tmp_path / "p.md"), str(tmp_path / "p.tex"))

    def get(defense, trigger, precision):
        hit = s[(s.defense == defense) & (s.trigger == trigger) & (s.precision == precision)]
        assert len(hit) == 1
        return hit.iloc[0]

    r = get("none", "square", "int8")
    assert r.seeds == 2
    assert r.asr_mean == pytest.approx(92.0) and r.ba_mean == pytest.approx(80.0)
    assert r.routing_change_triggered_mean == pytest.approx(15.0)  # in percent
    assert r.routing_change_clean_mean == pytest.approx(6.0)
    assert r.asr_std == pytest.approx(np.std([88, 96], ddof=1))
    assert get("none", "square", "int4").asr_mean == pytest.approx(70.0)
    assert get("none", "square", "fp32").ba_mean == pytest.approx(81.0)
    assert get("Fine-Pruning 10", "square", "int8").asr_mean == pytest.approx(5.0)
    assert get("none", "clean", "int8").routing_change_clean_mean == pytest.approx(4.0)
    assert len(s) == 3 + 2 + 2

    header, rows = _md_rows(tmp_path / "p.md")
    assert header == ["Dataset", "Model", "Defense", "Trigger", "Rate %", "Seeds", "ASR fp32", "ASR int8",
                      "ASR int4", "BA fp32", "BA int8", "BA int4", "routing Δ int8 (trig.)", "routing Δ int4 (trig.)"]
    assert rows == [
        ["c10", "pmoe", "Fine-Pruning 10", "square", "2", "1", "3.0", "5.0", "–", "83.0", "82.0", "–", "15.0", "–"],
        ["c10", "pmoe", "none", "clean", "–", "1", "–", "–", "–", "85.0", "84.0", "–", "4.0", "–"],
        ["c10", "pmoe", "none", "square", "2", "2", "95.0 ± 7.1", "92.0 ± 5.7", "70.0 ± 14.1", "81.0 ± 1.4",
         "80.0 ± 1.4", "72.0 ± 2.8", "15.0 ± 7.1", "40.0 ± 14.1"],
    ]
    assert "\\begin{tabular}" in (tmp_path / "p.tex").read_text()


def _nc(attack, seed, precision, l1s, index, flagged, flagged_class, detected, seconds, target=2):
    return {"dataset": "c10", "model": "pmoe", "attack": attack, "seed": seed, "precision": precision,
            "target": target, "images": 32, "seconds": seconds,
            "classes": [{"class": c, "l1": v, "asr": 1.0, "epochs_run": 5, "reached_threshold": True}
                        for c, v in l1s.items()],
            "anomaly_index": index, "flagged": flagged, "flagged_class": flagged_class, "detected_target": detected}


def test_detection_table(tmp_path):
    results = {
        "a0": _nc("square-2", 0, "fp32", {0: 100, 1: 110, 2: 10, 3: 90}, [0.1, 0.2, 3.0, 0.4], True, 2, True, 10),
        "a1": _nc("square-2", 1, "fp32", {0: 100, 1: 110, 2: 80, 3: 90}, [0.5, 0.6, 1.0, 0.7], False, None, False, 20),
        "c0": _nc("clean", 0, "fp32", {0: 100, 1: 20, 2: 100, 3: 100}, [0.0, 5.0, 0.3, 0.2], True, 1, False, 30),
        # the target (2) is not among the classes examined: no target statistics
        "q0": _nc("square-2", 0, "int8", {0: 50, 1: 70}, [0.0, 0.0], False, None, False, 8),
    }
    paths = []
    for name, m in results.items():
        write_json(tmp_path / f"{name}.json", m)
        paths.append(str(tmp_path / f"{name}.json"))
    s = detection_table(paths, str(tmp_path / "d.csv"), str(tmp_path / "d.md"), str(tmp_path / "d.tex"))
    assert len(s) == 3
    a = s[(s.trigger == "square") & (s.precision == "fp32")].iloc[0]
    assert a.models == 2
    assert a.flagged == pytest.approx(50.0) and a.detected_target == pytest.approx(50.0)
    assert a.target_anomaly_index == pytest.approx((3.0 + 1.0) / 2)
    assert a.target_l1 == pytest.approx((10 + 80) / 2)
    assert a.median_l1 == pytest.approx(95.0)  # medians (90+100)/2 and (90+100)/2
    assert a.seconds == pytest.approx(15.0)
    c = s[s.trigger == "clean"].iloc[0]
    assert c.flagged == 100.0 and c.detected_target == 0.0 and c.target_anomaly_index == pytest.approx(0.3)
    q = s[s.precision == "int8"].iloc[0]
    assert np.isnan(q.target_anomaly_index) and np.isnan(q.target_l1) and q.median_l1 == pytest.approx(60.0)

    header, rows = _md_rows(tmp_path / "d.md")
    assert len(header) == 12
    assert ["c10", "pmoe", "square", "2", "fp32", "2", "50.0", "50.0", "2.00", "45.0", "95.0", "15"] in rows
    assert ["c10", "pmoe", "clean", "–", "fp32", "1", "100.0", "–", "0.30", "100.0", "100.0", "30"] in rows
    assert ["c10", "pmoe", "square", "2", "int8", "1", "0.0", "0.0", "–", "–", "60.0", "8"] in rows


# ----------------------------------------------------------------------------------------------------------
# figures
# ----------------------------------------------------------------------------------------------------------

def _is_png(path: Path) -> bool:
    return path.is_file() and path.stat().st_size > 1000 and path.read_bytes()[:8] == PNG_MAGIC


def test_attack_figure_writes_png(runs, tmp_path):
    _, runs_csv, paper = runs
    out = tmp_path / "fig" / "attack.png"
    attack_figure([str(runs_csv)], str(paper), {"c10": "cifar10"}, str(out))
    assert _is_png(out)
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temporary file left


def test_patch_map_figure_writes_png(tmp_path):
    from pmoe_backdoor.models.routing import patch_grid, patch_sums
    from pmoe_backdoor.reporting.figures import patch_map_figure

    rng = np.random.default_rng(0)
    rows = []
    for model, triggered in (("clean", False), ("square-2", True)):
        image = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
        idx = np.stack([rng.choice(64, 16, replace=False) for _ in range(4)])
        rows.append({"model": model, "test_index": 3, "class": "cat", "triggered": triggered,
                     "image": image.tolist(), "maps": patch_grid(idx).tolist(),
                     "patch_sums": patch_sums(image).tolist(), "selected": idx.tolist()})
    write_json(tmp_path / "maps.json", {"dataset": "c10", "rows": rows})
    out = tmp_path / "maps.png"
    patch_map_figure(str(tmp_path / "maps.json"), str(out), "routing maps")
    assert _is_png(out)
