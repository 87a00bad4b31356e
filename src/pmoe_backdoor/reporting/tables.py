"""Writing result tables: numbers as cells, and one table as CSV (the data), Markdown, LaTeX and HTML (for
reading; the HTML page is what the Snakemake report shows)."""

from __future__ import annotations

import html
import math
import re
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import pandas as pd

from ..io import atomic_path


def pm(mean: float, std: float, digits: int = 1) -> str:
    """'mean ± std' (the std left out when undefined, e.g. for one seed); '–' for a missing mean."""
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "–"
    s = f"{mean:.{digits}f}"
    return s if std is None or math.isnan(std) else f"{s} ± {std:.{digits}f}"


def num(x: float, digits: int = 1, signed: bool = False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:+.{digits}f}" if signed else f"{x:.{digits}f}"


def std(x: pd.Series) -> float:
    """The sample standard deviation, undefined (nan) for a single value."""
    return float(x.std(ddof=1)) if len(x) > 1 else float("nan")


def write_csv(df: pd.DataFrame, path: str) -> None:
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)


def markdown(header: list[str], rows: list[list[str]], title: str = "") -> str:
    lines = ([f"**{title}**", ""] if title else []) + ["| " + " | ".join(header) + " |",
                                                        "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows]) + "\n"


def _tex_escape(s: str) -> str:
    return s.replace("\\", "\\textbackslash{}").replace("%", "\\%").replace("_", "\\_").replace("&", "\\&") \
        .replace("±", "$\\pm$").replace("–", "--").replace("Δ", "$\\Delta$")


def latex(header: list[str], rows: list[list[str]], caption: str) -> str:
    lines = ["\\begin{table}[t]", "\\centering", f"\\caption{{{_tex_escape(caption)}}}",
             "\\begin{tabular}{" + "l" * 2 + "r" * (len(header) - 2) + "}", "\\toprule",
             " & ".join(_tex_escape(h) for h in header) + " \\\\", "\\midrule"]
    lines += [" & ".join(_tex_escape(c) for c in r) + " \\\\" for r in rows]
    return "\n".join(lines + ["\\bottomrule", "\\end{tabular}", "\\end{table}"]) + "\n"


def write_table(header: list[str], rows: list[list[str]], title: str, out_md: str, out_tex: str,
                out_html: str | None = None, layout: HtmlLayout | None = None) -> None:
    """The readable forms of one table: Markdown (with the title above), LaTeX (with it as the caption) and, if
    asked, a self-contained HTML page (with it as the caption), laid out by ``layout`` (the page only)."""
    for path, text in ((out_md, markdown(header, rows, title)), (out_tex, latex(header, rows, title))):
        with atomic_path(path) as tmp:
            tmp.write_text(text)
    if out_html:
        write_html(out_html, header, rows, title, layout)


# ----- HTML: what the Snakemake report shows inline (one self-contained page per table) -----

@dataclass(frozen=True)
class HtmlLayout:
    """How a table's HTML page shows it so that it fits a browser window; the CSV, Markdown and LaTeX forms keep
    every column under its full name.

    header: per column, the label shown (default: the table's), or (group, label) to show the label under a heading
        shared with the neighbouring columns of the same group ("fp32" over "BA" and "ASR");
    cell_abbreviations: a cell's full text -> the shorter text shown instead, each used one explained in a glossary
        line under the table;
    parts: (caption, column indices) per table when the columns are shown as several narrower tables, each listing
        the columns that identify a row first."""

    header: Sequence[str | tuple[str, str]] | None = None
    cell_abbreviations: Mapping[str, str] = field(default_factory=dict)
    parts: Sequence[tuple[str, Sequence[int]]] = ()


# Numbers never wrap (a mean stays beside its std); headers and text cells wrap when the table would otherwise be
# wider than the window, so that the page fits without scrolling sideways. A header wider than 8em wraps anyway:
# left whole, a long header claims space that the table then takes from its text cells.
_CSS = """
body { font: 13px/1.4 -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; color: #222; margin: 12px; }
table { border-collapse: collapse; font-variant-numeric: tabular-nums; }
table + table { margin-top: 22px; }
caption, p.title { caption-side: top; text-align: left; font-weight: 600; padding: 0 0 8px; max-width: 70em; }
p.title { margin: 0 0 14px; }
th, td { padding: 3px 8px; border-bottom: 1px solid #e3e3e3; }
thead { position: sticky; top: 0; z-index: 1; }
th { max-width: 8em; background: #f3f4f6; border-bottom: 2px solid #9ca3af; text-align: center; }
th { vertical-align: bottom; }
th.span { border-bottom: 1px solid #9ca3af; }
tbody tr:nth-child(even) td:not(.delta) { background: #fafafa; }
tbody tr:hover td { outline: 1px solid #d1d5db; }
td.num { text-align: right; white-space: nowrap; }
.nb { white-space: nowrap; }
td.group { border-left: 2px solid #d1d5db; }
th.group { border-left: 2px solid #9ca3af; }
td.paper, th.paper, span.paper { color: #6b7280; font-style: italic; }
td.paper { background: #f4f4f5 !important; }
td.delta { font-weight: 600; }
span.na { color: #b0b0b0; }
.legend, .glossary { color: #444; margin-top: 10px; max-width: 70em; }
dfn { font-style: normal; font-weight: 600; }
.swatch { display: inline-block; padding: 0 6px; margin: 0 2px; border-radius: 3px; font-weight: 600; }
"""
_NUMERIC = re.compile(r"^[+\-−]?[0-9.]+( ± [0-9.]+)?( \[[0-9.\-]+\])?( %)?$")
_FULL_DELTA = 20.0  # percentage points at which a difference from the paper is fully coloured


def _delta_style(text: str) -> str:
    """A background by sign (blue: above the paper, red: below) and magnitude (stronger for a larger gap)."""
    try:
        value = float(text.replace("−", "-"))
    except ValueError:
        return ""
    if abs(value) < 0.05:
        return ""
    alpha = 0.12 + 0.58 * min(abs(value) / _FULL_DELTA, 1.0)
    rgb = "33, 102, 172" if value > 0 else "178, 24, 43"
    return f' style="background: rgba({rgb}, {alpha:.2f})"'


def _unbroken_hyphens(escaped: str) -> str:
    """Hyphenated words ("Fine-Pruning", "int8-f") kept whole: browsers may otherwise wrap a cell after a hyphen."""
    return re.sub(r"[^\s<>]+-[^\s<>]+", r'<span class="nb">\g<0></span>', escaped)


def _kept_units(escaped: str) -> str:
    """A unit stays on the line of its number ("30 %")."""
    return re.sub(r"(?<=\S) %", "&nbsp;%", escaped)


def _label(text: str) -> str:
    # "Routers/experts" may wrap after the slash
    return _unbroken_hyphens(_kept_units(html.escape(text)).replace("/", "/<wbr>"))


def _cell(text: str) -> str:
    text = html.escape(text)
    if text == "–":
        return '<span class="na">–</span>'
    text = _unbroken_hyphens(_kept_units(text))
    return re.sub(r"\[([^\]]*)\]", r'<span class="paper" title="the paper\'s value">[\1]</span>', text)


def _head(labels: Sequence[str | tuple[str, str]], th_class: Sequence[str]) -> str:
    """The header row, or two rows when some columns share a group heading (the others then span both rows); a
    group begins with a left rule."""
    if not any(isinstance(label, tuple) for label in labels):
        return "<tr>" + "".join(f'<th class="{c}">{_label(label)}</th>' for label, c in zip(labels, th_class)) + "</tr>"
    top, bottom, i = [], [], 0
    while i < len(labels):
        if not isinstance(labels[i], tuple):
            top.append(f'<th rowspan="2" class="{th_class[i]}">{_label(labels[i])}</th>')
            i += 1
            continue
        group, n = labels[i][0], 1
        while i + n < len(labels) and isinstance(labels[i + n], tuple) and labels[i + n][0] == group:
            n += 1
        top.append(f'<th colspan="{n}" class="span group">{_label(group)}</th>')
        bottom += [f'<th class="{" ".join(filter(None, ["group" if k == 0 else "", th_class[i + k]]))}">'
                   f"{_label(labels[i + k][1])}</th>" for k in range(n)]
        i += n
    return f"<tr>{''.join(top)}</tr>\n<tr>{''.join(bottom)}</tr>"


def html_table(header: Sequence[str], rows: Sequence[Sequence[str]], title: str,
               layout: HtmlLayout | None = None) -> str:
    """One table as a self-contained HTML page: the paper's values (a 'paper' column or '[x]' in a cell) in grey
    italics, each 'Δ' column (ours − paper) coloured by sign and magnitude, a legend for what is used; shown as
    ``layout`` says (other labels, group headings, abbreviated cells, several narrower tables)."""
    layout = layout or HtmlLayout()
    labels = list(layout.header or header)
    if len(labels) != len(header):
        raise ValueError(f"html_table: {len(labels)} labels for {len(header)} columns")
    kinds = ["paper" if h == "paper" else "delta" if h == "Δ" else "" for h in header]
    group = [i + 1 < len(header) and header[i + 1] == "paper" for i in range(len(header))]
    shown_rows = [[layout.cell_abbreviations.get(text, text) for text in row] for row in rows]

    def table(columns: Sequence[int], caption: str) -> str:
        th_class = [" ".join(filter(None, ["group" if group[i] else "", kinds[i]])) for i in columns]
        body = []
        for row in shown_rows:
            cells = []
            for i in columns:
                text = row[i]
                cls = [c for c in (kinds[i], "group" if group[i] else "", "num" if _NUMERIC.match(text) else "") if c]
                style = _delta_style(text) if kinds[i] == "delta" else ""
                title_attr = ' title="ours − paper"' if kinds[i] == "delta" else ""
                cells.append(f'<td class="{" ".join(cls)}"{style}{title_attr}>{_cell(text)}</td>')
            body.append("<tr>" + "".join(cells) + "</tr>")
        return (f"<table><caption>{html.escape(caption)}</caption>\n"
                f"<thead>{_head([labels[i] for i in columns], th_class)}</thead>\n<tbody>\n"
                + "\n".join(body) + "\n</tbody></table>\n")

    if layout.parts:
        tables = f'<p class="title">{html.escape(title)}</p>\n' + "".join(table(c, cap) for cap, c in layout.parts)
    else:
        tables = table(range(len(header)), title)
    used = {text for row in rows for text in row}
    glossary = {short: full for full, short in layout.cell_abbreviations.items() if full in used}
    legend = []
    if "paper" in kinds or any("[" in c for r in rows for c in r):
        legend.append('<span class="paper">grey italics</span>: the paper\'s published value')
    if "delta" in kinds:
        legend.append(f'Δ = ours − paper, in points: <span class="swatch" style="background: rgba(33, 102, 172, '
                      f'0.4)">above</span> / <span class="swatch" style="background: rgba(178, 24, 43, 0.4)">below'
                      f'</span> the paper, the stronger the colour the larger the gap (full at ≥ {_FULL_DELTA:g})')
    legend.append('<span class="na">–</span>: no value')
    glossary_line = ('<p class="glossary">' + "; ".join(f"<dfn>{html.escape(k)}</dfn>: {html.escape(v)}"
                                                      for k, v in glossary.items()) + ".</p>\n") if glossary else ""
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>\n"
            + tables + glossary_line + "<p class=\"legend\">" + "; ".join(legend) + ".</p>\n</body></html>\n")


def frame_cells(df: pd.DataFrame, digits: int = 2) -> tuple[list[str], list[list[str]]]:
    """A DataFrame's header and rows as text: floats rounded, missing values as '–'."""
    def text(v) -> str:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return "–"
        return f"{v:.{digits}f}" if isinstance(v, float) else str(v)

    return [str(c) for c in df.columns], [[text(v) for v in r] for r in df.itertuples(index=False)]


def write_html(path: str, header: Sequence[str], rows: Sequence[Sequence[str]], title: str,
               layout: HtmlLayout | None = None) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(html_table(header, rows, title, layout), encoding="utf-8")
