#!/usr/bin/env bash
# Quickstart 2: set up, then run the test suite (GPU tests skip on CPU). Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
