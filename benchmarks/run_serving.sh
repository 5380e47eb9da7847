#!/usr/bin/env bash
# The multi-turn serving tables of docs/BENCHMARKS.md, one named subcommand per run, each sized to end
# inside a 10-minute call on one H100 (times include building the model's random checkpoint once).
#
#   bash benchmarks/run_serving.sh SUBCOMMAND [extra multiturn.py options]     (--help: this text)
#
# Workload (all but smoke): synthetic ShareGPT scaled to reach steady state in a minute: think time 6 s,
# replies 41 tokens, 37.77 input tokens per turn, 45 s of arrivals measured from 20 s, one seed (0).
# Llama-2-13B-GQA10 and Llama-3.1-8B get 8 GB of GPU KV per system and a 48 GB CPU tier; OPT-13B the
# paper's 40 GB and 64 GB. Extra options go to benchmarks/multiturn.py after these (the last one wins),
# e.g. `headline-tiered --rates 30,34`.
#
#   smoke               CPU, the tiny random Llama, tiny turns: tiered / gpu / stateless / transformers   ~1 min, no GPU
#   headline-pair       Llama-2-13B-GQA10: tiered at 26 conv/s, then stateless at 22, one machine   ~9 min
#   headline-tiered     the same, tiered at 26 conv/s                                              ~4 min
#   headline-stateless  stateless at 18 and 22 conv/s (where it crosses the bounds)                 ~6 min
#   headline-gpu        the GPU-only prefix cache at 22 conv/s                                      ~4 min
#   opt13b-tiered       OPT-13B with 40 GB of GPU KV: tiered at 16 and 22 conv/s                    ~7 min
#   opt13b-gpu          the same, gpu at 16 and 22 conv/s                                           ~7 min
#   opt13b-stateless    the same, stateless at 16 and 22 conv/s                                     ~7 min
#   llama8b             Llama-3.1-8B: tiered and stateless at 18 and 26 conv/s                      ~9 min
#   transformers        HF transformers' continuous batching at 1 conv/s (30 s of arrivals)         ~4 min
#   ablations           tiered, tiered-lru, tiered-noaot, tiered-nopipe at 18 conv/s, 8 GB CPU tier ~9 min
#   async               tiered and tiered-sync (no async scheduling) at 22 and 26 conv/s            ~9 min
#   linear              tiered at 26 with the small-batch linear, then with cuBLAS                  ~8 min
#   engine-process      tiered at 22 with the engine on a thread, then in its own process           ~9 min
#   merge DEST RUN...   merge runs (folders, or FOLDER:SYSTEM[@RATE],...) into one report in DEST
#
# Output: OUT/SUBCOMMAND/ (OUT defaults to benchmarks/results/run-DATE) with run.txt (commit, device,
# versions) and multiturn.py's results.json, summary.md, latency.png, command.txt and partial.json;
# subcommands of several runs keep each in its own folder and merge them into OUT/SUBCOMMAND/.
# Environment: see benchmarks/common.sh (OUT, PYTHON, CKPT, TIMEOUTS, PACK).

source "$(dirname "$0")/common.sh"

SCALED=(--no-progress --think-time 6 --output-mean 41 --input-mean 37.77 --duration 45 --time-limit 50
        --warmup 20 --bounds 0.02,0.03,0.05,0.08,0.1,0.15)
GQA=(--checkpoint-dir "$CKPT/llama-2-13b-gqa10" --model-shape llama-2-13b-gqa10 "${SCALED[@]}" --gpu-kv-gb 8 --kv-offloading-size 48)
L8B=(--checkpoint-dir "$CKPT/llama-3.1-8b" --model-shape llama-3.1-8b "${SCALED[@]}" --gpu-kv-gb 8 --kv-offloading-size 48)
OPT=(--checkpoint-dir "$CKPT/opt-13b" --model-shape opt-13b "${SCALED[@]}" --gpu-kv-gb 40 --kv-offloading-size 64 --stop-above 0.15)

mt() { run_py "$1" "$2" multiturn.py "${@:3}"; }  # mt SECONDS DIR ARGS...: one multiturn.py run into DIR

merge() {  # merge DEST RUN...: one report over several runs (the device from this machine unless DEVICE is set)
  local dest=$1
  shift
  "$PYTHON" benchmarks/report_partial.py "$@" --out "$dest" --device "${DEVICE:-$(device_name)}"
}

name=${1:-}
[ -n "$name" ] && shift
case "$name" in
  ""|-h|--help|help) usage "$0"; exit 0 ;;
  merge) merge "$@"; exit $? ;;
  smoke|headline-pair|headline-tiered|headline-stateless|headline-gpu|opt13b-tiered|opt13b-gpu|opt13b-stateless) ;;
  llama8b|transformers|ablations|async|linear|engine-process) ;;
  *) echo "unknown subcommand: $name (see --help)" >&2; exit 2 ;;
esac
dir="$OUT/$name"
stamp "$dir" "$name" "$@"
case "$name" in
  smoke)
    mt 300 "$dir" --quick --systems tiered,gpu,stateless,transformers "$@" ;;
  headline-pair)
    mt 330 "$dir/tiered" "${GQA[@]}" --systems tiered --rates 26 "$@"
    mt 200 "$dir/stateless" "${GQA[@]}" --systems stateless --rates 22 "$@"
    merge "$dir" "$dir/tiered" "$dir/stateless" ;;
  headline-tiered)
    mt 330 "$dir" "${GQA[@]}" --systems tiered --rates 26 "$@" ;;
  headline-stateless)
    mt 400 "$dir" "${GQA[@]}" --systems stateless --rates 18,22 "$@" ;;
  headline-gpu)
    mt 250 "$dir" "${GQA[@]}" --systems gpu --rates 22 "$@" ;;
  opt13b-tiered|opt13b-gpu|opt13b-stateless)
    mt 560 "$dir" "${OPT[@]}" --systems "${name#opt13b-}" --rates 16,22 "$@" ;;
  llama8b)
    mt 560 "$dir" "${L8B[@]}" --systems tiered,stateless --rates 18,26 "$@" ;;
  transformers)
    mt 300 "$dir" "${GQA[@]}" --systems transformers --rates 1 --duration 30 --time-limit 40 --warmup 10 "$@" ;;
  ablations)
    mt 560 "$dir" "${GQA[@]}" --kv-offloading-size 8 --systems tiered,tiered-lru,tiered-noaot,tiered-nopipe --rates 18 "$@" ;;
  async)
    mt 560 "$dir" "${GQA[@]}" --systems tiered,tiered-sync --rates 22,26 "$@" ;;
  linear)
    mt 330 "$dir/kernel" "${GQA[@]}" --systems tiered --rates 26 "$@"
    PENSIEVE_SMALL_BATCH_LINEAR=0 mt 200 "$dir/cublas" "${GQA[@]}" --systems tiered --rates 26 "$@" ;;
  engine-process)
    mt 260 "$dir/thread" "${GQA[@]}" --systems tiered --rates 22 "$@"
    mt 290 "$dir/process" "${GQA[@]}" --systems tiered --rates 22 --engine-process "$@" ;;
esac
status=$?
echo "[$(date +%T)] $name done (exit $status): $dir"
pack "$dir"
exit $status
