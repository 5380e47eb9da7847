#!/usr/bin/env bash
# Sets up .venv (a no-op once done: scripts/setup.sh) and starts the OpenAI-compatible server;
# with no MODEL it serves the demo model. Arguments go to `pensieve serve`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${PENSIEVE_VENV:-.venv}/bin/pensieve" serve "$@"
