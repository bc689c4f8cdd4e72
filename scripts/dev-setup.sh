#!/usr/bin/env bash
# Create .venv with everything the tests need. Safe to re-run.
# torch first (the local CPU build), or pip may choose a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q torch==2.13.0
.venv/bin/pip install -q -e ".[test,data,teachers,tf]"
