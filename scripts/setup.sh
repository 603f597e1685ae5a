#!/usr/bin/env bash
# Set up .venv for binq on a fresh machine: the pinned CPU torch first (an unpinned torch would pull a
# multi-GB CUDA build), then binq itself; `--test` adds pytest and ruff.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$python" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
if [ "${1:-}" = "--test" ]; then
    .venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[test]"
else
    .venv/bin/python -m pip install --quiet --disable-pip-version-check -e .
fi
