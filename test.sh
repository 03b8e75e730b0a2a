#!/usr/bin/env bash
# Run the test suite: sets the project up first when .venv is missing or out of date (as setup.sh
# does, torch first), then runs pytest in .venv. Extra arguments go to pytest.
#   bash test.sh            # everything, offline, CPU only
#   bash test.sh -k app     # a selection
set -euo pipefail
cd "$(dirname "$0")"
digest=$(cat pyproject.toml constraints.txt setup.sh | sha256sum | cut -d' ' -f1)
if [ ! -x .venv/bin/python ] || [ "$(cat .venv/.sd-scenes-setup 2>/dev/null)" != "$digest" ]; then
  bash setup.sh
fi
exec .venv/bin/python -m pytest -q "$@"
