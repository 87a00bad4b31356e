"""Writing result tables: numbers as cells, and one table as CSV (the data), Markdown and LaTeX (for reading)."""

from __future__ import annotations

import math

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


def write_table(header: list[str], rows: list[list[str]], title: str, out_md: str, out_tex: str) -> None:
    """The readable forms of one table: Markdown (with the title above) and LaTeX (with it as the caption)."""
    for path, text in ((out_md, markdown(header, rows, title)), (out_tex, latex(header, rows, title))):
        with atomic_path(path) as tmp:
            tmp.write_text(text)
