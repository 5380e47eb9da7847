#!/usr/bin/env bash
# Sets up .venv and starts the OpenAI-compatible server; with no MODEL it serves the built-in demo model.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${PENSIEVE_VENV:-.venv}/bin/pensieve" serve "$@"
