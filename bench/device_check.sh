#!/usr/bin/env bash
# The prepared accelerator check (under 5 minutes on one GPU or TPU host): see bench/device_check.py.
#   bash bench/device_check.sh [--tiny] [--batch B] [--seq S] [--rounds R]
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=.venv/bin/python
export TF_CPP_MIN_LOG_LEVEL=3
exec "$PY" bench/device_check.py "$@"
