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
# the real bert4keras, for the Keras save_weights tests; its keras<=2.3.1 pin would break TensorFlow
.venv/bin/pip install -q --no-deps bert4keras==0.11.5
# Headless Chromium for the demo page's browser test (Debian's package; Playwright drives it and
# never downloads a browser). Needs root; without it that one test skips with its reason.
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium fonts-wqy-microhei >/dev/null
fi
