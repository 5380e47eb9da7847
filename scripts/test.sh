#!/usr/bin/env bash
# Sets up .venv (CPU torch on CPU machines) and runs the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
exec "${PENSIEVE_VENV:-.venv}/bin/python" -m pytest -q "$@"
