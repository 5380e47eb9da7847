#!/usr/bin/env bash
# Creates .venv and installs Pensieve into it. On a machine without a CUDA
# GPU it first installs the CPU build of torch, so pip never pulls a
# multi-GB CUDA build; where torch is already importable it is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${PENSIEVE_VENV:-.venv}"
EXTRAS="${1:-}"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PY="$VENV/bin/python"
if ! "$PY" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    "$PY" -m pip install -q torch
  else
    "$PY" -m pip install -q "torch==2.13.0"
  fi
fi
# triton 3.6 matches the GPU machines; numpy<2.4 keeps its CPU interpreter working.
"$PY" -m pip install -q "triton==3.6.0" "numpy<2.4" -e ".${EXTRAS:+[$EXTRAS]}"
