#!/usr/bin/env bash
# Create .venv and install pmoe-backdoor with the workflow and test extras.
# TORCH_SPEC overrides the torch pin (e.g. TORCH_SPEC="torch torchvision" for the newest release).
set -euo pipefail
cd "$(dirname "$0")"
PYTHON="${PYTHON:-python3}"
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
  || { echo "setup.sh: Python 3.11 or newer is required (found $("$PYTHON" --version))" >&2; exit 1; }
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet ${TORCH_SPEC:-torch==2.14.1 torchvision==0.29.1}
.venv/bin/python -m pip install --quiet -e '.[workflow,test,slurm]'
echo "setup.sh: installed into .venv ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
