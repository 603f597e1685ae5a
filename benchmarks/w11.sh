#!/usr/bin/env bash
# The W(1+1)A(1x4) runs of docs/W11.md (the rows of its generated section `w11-quality`, from the catalogue in
# src/binq/runs.py), quick protocol, one after another; a run whose report exists is skipped.
# Usage: benchmarks/w11.sh [benchmarks/quality.py options, e.g. --rows 'w11 obs,w11 obs a4' or --dry-run]
# Reports in runs/catalogue/<slug>/; then: python benchmarks/tables.py --collect runs/catalogue && python benchmarks/tables.py
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
"$PYTHON" benchmarks/quality.py --section w11-quality "$@"
