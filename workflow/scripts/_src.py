"""Imported first by every script: the jobs use the pmoe_backdoor of this workflow's own src/ folder, so they run
in a conda environment or on a cluster node without installing the package."""

import sys
from pathlib import Path

SRC = str(Path(__file__).resolve().parents[2] / "src")
if SRC not in sys.path:
    sys.path.insert(0, SRC)
