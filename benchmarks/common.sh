# Shared by benchmarks/run_*.sh and gpu_check.sh (sourced, not run): where results go, what each run
# records about itself, and the help text (a script's header comment, printed by --help).
#
#   OUT       results root (default benchmarks/results/run-DATE); each subcommand writes OUT/NAME/
#   PYTHON    interpreter with torch, triton and this package's dependencies (default python3)
#   CKPT      where random-weight checkpoints of the real shapes are built once and kept (default
#             /tmp/pensieve-ckpt; a 13B checkpoint takes 30-45 s to build)
#   TIMEOUTS  0 runs every step to its end; by default each step of a subcommand has the time limit
#             noted beside it, so that a subcommand ends inside a 10-minute call and a step cut off
#             still leaves what it measured (partial.json, or the rows written so far)
#   PACK      1 packs OUT/NAME into OUT/NAME.tgz at the end (for runners that return few files)
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT=${OUT:-benchmarks/results/run-$(date +%Y%m%d-%H%M%S)}
PYTHON=${PYTHON:-python3}
CKPT=${CKPT:-/tmp/pensieve-ckpt}

usage() {  # the calling script's header: the lines after the shebang up to the first blank line
  sed -n '2,/^$/{s/^# \{0,1\}//;p}' "$1"
}

run_py() {  # run_py SECONDS DIR SCRIPT ARGS...: benchmarks/SCRIPT ARGS --out DIR under `limit SECONDS`, logged
  local seconds=$1 dir=$2 script=$3
  shift 3
  echo "[$(date +%T)] $script $* -> $dir"
  limit "$seconds" "$PYTHON" "benchmarks/$script" "$@" --out "$dir"
}

limit() {  # limit SECONDS CMD...: run CMD, stopped after SECONDS unless TIMEOUTS=0
  local seconds=$1
  shift
  if [ "${TIMEOUTS:-1}" = 0 ]; then "$@"; else timeout "$seconds" "$@"; fi
}

commit() {  # COMMIT, else this checkout's commit (marked when it has uncommitted changes), else unknown
  if [ -n "${COMMIT:-}" ]; then echo "$COMMIT"; return; fi
  local head
  head=$(git rev-parse --short HEAD 2>/dev/null) || { echo unknown; return; }
  git diff --quiet HEAD 2>/dev/null && echo "$head" || echo "$head (uncommitted changes)"
}

device_name() {
  nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | grep . || echo cpu
}

stamp() {  # stamp DIR NAME ARGS...: what ran, at which commit, on which device, when -> DIR/run.txt
  local dir=$1 name=$2
  shift 2
  mkdir -p "$dir"
  {
    echo "subcommand: $name $*"
    echo "commit: $(commit)"
    echo "device: $(device_name)"
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    "$PYTHON" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" 2>/dev/null
  } > "$dir/run.txt"
}

pack() {  # pack DIR: DIR -> DIR.tgz when PACK=1
  if [ "${PACK:-0}" = 1 ] && [ -d "$1" ]; then
    tar czf "$1.tgz" -C "$(dirname "$1")" "$(basename "$1")" && rm -rf "$1" && echo "packed $1.tgz"
  fi
}
