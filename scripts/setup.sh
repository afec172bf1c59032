#!/usr/bin/env bash
# Create .venv and install what halluc needs, once (re-runs only when requirements change).
# torch comes FIRST and pinned: torch==2.13.0 is the CPU build these machines carry; an unpinned
# torch pulls a multi-GB CUDA build. Set HALLUC_TORCH to install another (e.g. "torch==2.11.0").
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_SPEC=${HALLUC_TORCH:-torch==2.13.0}
STAMP=.venv/.halluc-installed
WANT="$(cat requirements.txt pyproject.toml) $TORCH_SPEC"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ]; then
  exit 0
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
echo "setup: installing $TORCH_SPEC, then requirements.txt into .venv (a few minutes, once)"
.venv/bin/python -m pip install -q --upgrade pip setuptools
.venv/bin/python -m pip install -q "$TORCH_SPEC"
.venv/bin/python -m pip install -q -r requirements.txt
# halluc itself, editable: recipes, tools and tests import it from this checkout, no sys.path edits
.venv/bin/python -m pip install -q --no-deps --no-build-isolation -e .
echo "$WANT" > "$STAMP"
