#!/usr/bin/env bash
# `pensieve bench --systems http` through vllm-router in front of N replicas (`pensieve serve-replicas`), once
# per router policy, on the same workload: the chosen policy (cache_aware) against round_robin.
#
#   bash benchmarks/run_replicas_bench.sh                          # 3 demo replicas on the CPU
#   REPLICAS=4 SERVE_ARGS="/models/llama-3.1-8b --cache-mode tiered" \
#     BENCH_ARGS="--rates 4,8 --duration 120 --think-time 10" OUT=benchmarks/results/replicas-gpu \
#     bash benchmarks/run_replicas_bench.sh                        # 4 GPUs, one replica each
#
# Writes OUT/bench-<policy>/ (results.json, summary.md, latency.png) and OUT/bench-command.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"
REPLICAS="${REPLICAS:-3}"
POLICIES="${POLICIES:-cache_aware round_robin}"
OUT="${OUT:-benchmarks/results/replicas}"
PORT="${PORT:-18800}"
# the tiny random Llama of the tests, as measured (MODEL= any checkpoint; the demo model is SmolLM2's GGUF)
MODEL="${MODEL:-$("$PY" -c 'from pensieve.model.tiny_llama import tiny_llama_path; print(tiny_llama_path())')}"
SERVE_ARGS="${SERVE_ARGS:-$MODEL --device cpu --dtype float32 --num-gpu-blocks-override 1024 --num-cpu-blocks 1024 --max-model-len 1024}"
BENCH_ARGS="${BENCH_ARGS:---rates 0.5,1 --duration 40 --think-time 3 --max-input-tokens 48 --max-output-tokens 16 --max-context 900}"
mkdir -p "$OUT"
echo "# $(date -u +%FT%TZ) commit $(git rev-parse --short HEAD), $(uname -n), $(nproc) CPUs" > "$OUT/bench-command.txt"
for policy in $POLICIES; do
  log="$OUT/bench-$policy-serve.log"
  cmd=("$PY" -m pensieve.cli serve-replicas --replicas "$REPLICAS" --policy "$policy" --port "$PORT"
       --replica-port $((PORT + 10)) --router-metrics-port $((PORT + 1)) -- $SERVE_ARGS)
  echo "${cmd[*]}" >> "$OUT/bench-command.txt"
  "${cmd[@]}" > "$log" 2>&1 &
  pid=$!
  trap 'kill -TERM $pid 2>/dev/null || true' EXIT
  until grep -q "behind vllm-router" "$log"; do
    kill -0 $pid 2>/dev/null || { cat "$log"; exit 1; }
    sleep 1
  done
  bench=("$PY" -m pensieve.cli bench --systems "http:$policy" --url "http://127.0.0.1:$PORT" --api chat --seed 0
         $BENCH_ARGS --bounds 0.05,0.1,0.2,0.5 --out "$OUT/bench-$policy" --no-progress)
  echo "${bench[*]}" >> "$OUT/bench-command.txt"
  "${bench[@]}"
  kill -TERM $pid
  wait $pid || true
  rm -f "$log"
done
