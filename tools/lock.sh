#!/usr/bin/env bash
# Upgrade the pinned versions on purpose: install the newest releases that pyproject.toml allows into a
# scratch environment, run the test suite there, and only if it passes write constraints.txt.
#   bash tools/lock.sh
set -euo pipefail
cd "$(dirname "$0")/.."
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
python3 -m venv "$scratch/venv"
"$scratch/venv/bin/pip" install --quiet "${TORCH_SPEC:-torch==2.13.0}"
"$scratch/venv/bin/pip" install --quiet --upgrade ".[dev,test,audio,ray]"
"$scratch/venv/bin/pip" install --quiet --no-deps -e .
"$scratch/venv/bin/python" -m pytest -q -p no:cacheprovider
{
  echo "# Versions a fresh set-up installs: the set the test suite last passed with (see README, Set-up)."
  echo "# torch is not here: setup.sh installs it first (TORCH_SPEC), so a GPU build is never replaced."
  echo "# Upgrade on purpose with: bash tools/lock.sh  (then run the tests and commit this file)."
  "$scratch/venv/bin/pip" freeze --exclude-editable \
    | grep -viE '^(torch|sympy|mpmath|networkx|jinja2|markupsafe)==|^#|^-e'
} > constraints.txt
echo "constraints.txt updated; review 'git diff constraints.txt' and commit it"
