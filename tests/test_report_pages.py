"""The pages the Snakemake report shows: tables as self-contained HTML, the configuration record, and the clean
run's (empty) poison record that keeps every training job at the same depth of the DAG."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest
import yaml

from pmoe_backdoor.reporting.configpage import config_record, configfile_texts
from pmoe_backdoor.reporting.tables import HtmlLayout, frame_cells, html_table, markdown, write_table

HEADER = ["Model", "Trigger", "ASR %", "paper", "Δ", "CA before"]
ROWS = [["pmoe", "clean", "–", "–", "–", "85.0 ± 1.4"],
        ["pmoe", "square", "95.0 ± 7.1", "97.0", "-2.0", "85.0 ± 1.4 [84.9]"],
        ["pmoe", "blend", "60.0", "99.0", "-39.0", "85.0"],
        ["pmoe", "warped", "<b>", "1.0", "+4.0", "85.0"]]


def _cells(page: str, row: int) -> list[str]:
    body = page.split("<tbody>")[1]
    return re.findall(r"<td[^>]*>.*?</td>", body.split("<tr>")[row + 1])


def test_html_table_styles_paper_values_and_differences(tmp_path):
    write_table(HEADER, ROWS, "A & B: title", str(tmp_path / "t.md"), str(tmp_path / "t.tex"),
                str(tmp_path / "t.html"))
    page = (tmp_path / "t.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and "<style>" in page and "<script" not in page  # self-contained
    assert "<caption>A &amp; B: title</caption>" in page
    assert page.count("<tr>") == 1 + len(ROWS) and page.count("<th ") == len(HEADER)
    square, blend, warped = _cells(page, 1), _cells(page, 2), _cells(page, 3)
    assert 'class="paper' in square[3] and 'class="delta' in square[4]
    # Δ coloured by sign (red below the paper, blue above) and magnitude (a larger gap, a stronger colour)
    alpha = lambda cell: float(re.search(r"rgba\(178, 24, 43, ([0-9.]+)\)", cell).group(1))  # noqa: E731
    assert alpha(blend[4]) > alpha(square[4])
    assert "rgba(33, 102, 172" in warped[4]
    assert '<span class="paper"' in square[5] and "[84.9]" in square[5]  # a bracketed paper value
    assert "&lt;b&gt;" in warped[2]  # cells are escaped
    assert 'class="na"' in _cells(page, 0)[2]
    assert "ours − paper" in page  # the legend
    assert (tmp_path / "t.md").is_file() and (tmp_path / "t.tex").is_file()


def test_html_table_without_paper_columns_has_no_delta_legend():
    page = html_table(["Dataset", "BA"], [["c10", "80.0"]], "plain")
    assert "ours − paper" not in page and "td class=\"num\"" in page


def test_html_layout_groups_splits_and_abbreviates_the_page_only(tmp_path):
    header = ["Model", "Precision", "fp32 BA", "fp32 ASR", "int4 BA", "int4 ASR", "Note"]
    dynamic = "int8 dynamic (PyTorch: Linear layers only)"
    rows = [["pmoe", dynamic, "80.0", "90.0 ± 1.0", "70.0", "60.0", "Fine-Pruning"],
            ["pmoe", "fp32", "81.0", "91.0", "71.0", "61.0", "30 %"]]
    layout = HtmlLayout(header=["Model", "Precision", ("fp32", "BA"), ("fp32", "ASR"), ("int4", "BA"), ("int4", "ASR"),
                                "Note"],
                        cell_abbreviations={dynamic: "int8_dynamic", "int4 weight-only (simulated)": "int4"},
                        parts=[("fp32", [0, 1, 2, 3]), ("int4 and notes", [0, 1, 4, 5, 6])])
    write_table(header, rows, "title", str(tmp_path / "t.md"), str(tmp_path / "t.tex"), str(tmp_path / "t.html"),
                layout)
    assert (tmp_path / "t.md").read_text() == markdown(header, rows, "title")  # the full names, one table
    page = (tmp_path / "t.html").read_text()
    tables = page.split("<table>")[1:]
    assert len(tables) == 2 and '<p class="title">title</p>' in page
    assert "<caption>fp32</caption>" in tables[0] and "<caption>int4 and notes</caption>" in tables[1]
    # a group heading over its columns, the other columns spanning both header rows; the key columns in both
    assert '<th colspan="2" class="span group">fp32</th>' in tables[0] and "int4" not in tables[0].split("<tbody>")[0]
    assert tables[0].count('rowspan="2"') == 2 and tables[1].count('rowspan="2"') == 3
    assert all(t.split("<tbody>")[1].count("<tr>") == len(rows) for t in tables)
    # the abbreviated cell in the table, its full text in the glossary (only the abbreviations used)
    assert ">int8_dynamic</td>" in page and f"<dfn>int8_dynamic</dfn>: {dynamic}" in page
    assert "weight-only" not in page
    # a hyphenated word and a number with its unit do not wrap
    assert '<span class="nb">Fine-Pruning</span>' in page and "30&nbsp;%" in page
    with pytest.raises(ValueError, match="2 labels for 7 columns"):
        html_table(header, rows, "title", HtmlLayout(header=["a", "b"]))

def test_frame_cells_formats_floats_and_missing_values():
    header, rows = frame_cells(pd.DataFrame({"a": ["x", "y"], "b": [1.23456, np.nan], "c": [1, 2]}))
    assert header == ["a", "b", "c"] and rows == [["x", "1.23", "1"], ["y", "–", "2"]]


def test_config_record_writes_the_merged_config_and_each_file(tmp_path):
    cfg_file = tmp_path / "study.yaml"
    cfg_file.write_text("# my study\nseeds: {clean: 2}\n")
    config = {"seeds": {"clean": 3, "attack": 1}, "datasets": {"synth": {"n_train": 600}}}
    config_record(config, configfile_texts([cfg_file]), {"seeds": {"clean": 3}}, str(tmp_path / "c.yaml"),
                  str(tmp_path / "c.html"))
    assert yaml.safe_load((tmp_path / "c.yaml").read_text()) == config
    page = (tmp_path / "c.html").read_text()
    assert str(cfg_file) in page and "# my study" in page  # the file given, by path, with its text
    assert "Merged configuration" in page and "n_train: 600" in page
    assert "Command-line overrides" in page


def test_clean_run_poison_record_is_empty(tmp_path):
    from pmoe_backdoor.attacks.poison import PoisonRecord
    from pmoe_backdoor.jobs.poison import clean_record_file

    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x_train=rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8),
             y_train=np.arange(8) % 2, x_test=rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8),
             y_test=np.arange(4) % 2, classes=np.asarray(["a", "b"]))
    clean_record_file(str(tmp_path / "d.npz"), str(tmp_path / "clean.safetensors"))
    rec = PoisonRecord.load(tmp_path / "clean.safetensors")
    assert len(rec.indices) == 0 and tuple(rec.images.shape) == (0, 32, 32, 3)
