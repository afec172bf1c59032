#!/usr/bin/env bash
# Quickstart 1: set up, then run the main job on the embedded default (CPU, no downloads).
# Extra arguments go to the recipe, e.g.  bash scripts/lab.sh sft.steps=100
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python recipes/masked_sft.py "$@"
