"""Writing result tables: numbers as cells, and one table as CSV (the data), Markdown, LaTeX and HTML (for
reading; the HTML page is what the Snakemake report shows)."""

from __future__ import annotations

import html
import math
import re
from typing import Sequence

import pandas as pd

from .io import atomic_path


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
                out_html: str | None = None) -> None:
    """The readable forms of one table: Markdown (with the title above), LaTeX (with it as the caption) and, if
    asked, a self-contained HTML page (with it as the caption)."""
    for path, text in ((out_md, markdown(header, rows, title)), (out_tex, latex(header, rows, title))):
        with atomic_path(path) as tmp:
            tmp.write_text(text)
    if out_html:
        write_html(out_html, header, rows, title)


# ----- HTML: what the Snakemake report shows inline (one self-contained page per table) -----

_CSS = """
body { font: 13px/1.4 -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; color: #222; margin: 12px; }
table { border-collapse: collapse; font-variant-numeric: tabular-nums; }
caption { caption-side: top; text-align: left; font-weight: 600; padding: 0 0 8px; max-width: 70em; }
th, td { padding: 3px 8px; border-bottom: 1px solid #e3e3e3; white-space: nowrap; }
th { position: sticky; top: 0; background: #f3f4f6; border-bottom: 2px solid #9ca3af; text-align: center; }
tbody tr:nth-child(even) td:not(.delta) { background: #fafafa; }
tbody tr:hover td { outline: 1px solid #d1d5db; }
td.num { text-align: right; }
td.group { border-left: 2px solid #d1d5db; }
th.group { border-left: 2px solid #9ca3af; }
td.paper, th.paper, span.paper { color: #6b7280; font-style: italic; }
td.paper { background: #f4f4f5 !important; }
td.delta { font-weight: 600; }
span.na { color: #b0b0b0; }
.legend { color: #444; margin-top: 10px; max-width: 70em; }
.swatch { display: inline-block; padding: 0 6px; margin: 0 2px; border-radius: 3px; font-weight: 600; }
"""
_NUMERIC = re.compile(r"^[+\-−]?[0-9.]+( ± [0-9.]+)?( \[[0-9.\-]+\])?$")
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


def _cell(text: str) -> str:
    text = html.escape(text)
    if text == "–":
        return '<span class="na">–</span>'
    return re.sub(r"\[([^\]]*)\]", r'<span class="paper" title="the paper\'s value">[\1]</span>', text)


def html_table(header: Sequence[str], rows: Sequence[Sequence[str]], title: str) -> str:
    """One table as a self-contained HTML page: the paper's values (a 'paper' column or '[x]' in a cell) in grey
    italics, each 'Δ' column (ours − paper) coloured by sign and magnitude, a legend for what is used."""
    kinds = ["paper" if h == "paper" else "delta" if h == "Δ" else "" for h in header]
    group = [i + 1 < len(header) and header[i + 1] == "paper" for i in range(len(header))]
    head = "".join(f'<th class="{"group " if group[i] else ""}{kinds[i]}">{html.escape(h)}</th>'
                   for i, h in enumerate(header))
    body = []
    for row in rows:
        cells = []
        for i, text in enumerate(row):
            cls = [c for c in (kinds[i], "group" if group[i] else "", "num" if _NUMERIC.match(text) else "") if c]
            style = _delta_style(text) if kinds[i] == "delta" else ""
            title_attr = ' title="ours − paper"' if kinds[i] == "delta" else ""
            cells.append(f'<td class="{" ".join(cls)}"{style}{title_attr}>{_cell(text)}</td>')
        body.append("<tr>" + "".join(cells) + "</tr>")
    legend = []
    if "paper" in kinds or any("[" in c for r in rows for c in r):
        legend.append('<span class="paper">grey italics</span>: the paper\'s published value')
    if "delta" in kinds:
        legend.append(f'Δ = ours − paper, in points: <span class="swatch" style="background: rgba(33, 102, 172, '
                      f'0.4)">above</span> / <span class="swatch" style="background: rgba(178, 24, 43, 0.4)">below'
                      f'</span> the paper, the stronger the colour the larger the gap (full at ≥ {_FULL_DELTA:g})')
    legend.append('<span class="na">–</span>: no value')
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>\n"
            f"<table><caption>{html.escape(title)}</caption>\n<thead><tr>{head}</tr></thead>\n<tbody>\n"
            + "\n".join(body) + "\n</tbody></table>\n<p class=\"legend\">" + "; ".join(legend) + ".</p>\n"
            "</body></html>\n")


def frame_cells(df: pd.DataFrame, digits: int = 2) -> tuple[list[str], list[list[str]]]:
    """A DataFrame's header and rows as text: floats rounded, missing values as '–'."""
    def text(v) -> str:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return "–"
        return f"{v:.{digits}f}" if isinstance(v, float) else str(v)

    return [str(c) for c in df.columns], [[text(v) for v in r] for r in df.itertuples(index=False)]


def write_html(path: str, header: Sequence[str], rows: Sequence[Sequence[str]], title: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(html_table(header, rows, title), encoding="utf-8")
