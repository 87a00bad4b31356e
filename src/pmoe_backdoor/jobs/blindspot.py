"""Blindspot stage: the quantization-blindspot table and figure of every defense at every precision, and the
patch-ablation defenses' localisation figure (the defenses themselves run through the generic job, jobs/defend.py)."""

from __future__ import annotations

from ..reporting.blindspot import blindspot_figure, blindspot_table
from ..reporting.localisation import localisation_figure

__all__ = ["blindspot_figure", "blindspot_table", "localisation_figure"]
