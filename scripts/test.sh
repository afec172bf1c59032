#!/usr/bin/env bash
# Quickstart 2: set up, then run the test suite (GPU tests skip on CPU). Extra args go to pytest.
# The suite runs on every core (pytest-xdist; `-n 0` runs it in one process) and prints its ten
# slowest tests. Tiers and what they cost: README.md, "Tests".
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q -p no:cacheprovider -n auto --dist loadfile --durations=10 "$@"
