#!/usr/bin/env bash
# One-step set-up: a virtual environment in .venv with torch first, then this project.
#   bash setup.sh                      # CPU build of torch 2.13.0 where the machine offers it, else PyPI's
#   TORCH_SPEC="torch==2.5.1" bash setup.sh   # any other torch build you need (e.g. for your CUDA)
# torch is installed before anything else on purpose: if a dependency pulled it in first, pip would
# pick the newest build with gigabytes of CUDA packages, even on a machine with no GPU.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
  .venv/bin/pip install --quiet "${TORCH_SPEC:-torch==2.13.0}"
fi
# constraints.txt pins every other package to the versions the tests last passed with, so a fresh
# machine runs what was tested; SD_SCENES_UNPINNED=1 takes the newest releases pyproject.toml allows.
if [ "${SD_SCENES_UNPINNED:-0}" = 1 ]; then
  .venv/bin/pip install --quiet -e ".[dev,test,audio,ray]"
else
  .venv/bin/pip install --quiet -c constraints.txt -e ".[dev,test,audio,ray]"
fi
.venv/bin/python -c "import torch, diffusers, transformers; print('ready: torch', torch.__version__, '| diffusers', diffusers.__version__, '| transformers', transformers.__version__)"
# The stamp pipeline/bootstrap.py and test.sh read: this set-up matches these files (set up again if they change).
cat pyproject.toml constraints.txt setup.sh | sha256sum | cut -d' ' -f1 >.venv/.sd-scenes-setup
