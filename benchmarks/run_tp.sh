#!/usr/bin/env bash
# Tensor parallelism on several GPUs of one host: the CUDA checks, then the paper's multi-GPU rows
# (Llama 2-70B and OPT-66B on four GPUs, 3.0x and 2.04x vLLM's throughput there). Needs TP GPUs.
#
#   bash benchmarks/run_tp.sh SUBCOMMAND [extra options]     (--help: this text)
#
#   tests        the tensor-parallel tests on CUDA at TP=2 and TP=4 (NCCL, CUDA graphs with the
#                all-reduce, every rank's copy streams; greedy equal TP=1; tiered with forced swaps and
#                drops equal stateless), then the single-GPU cache-equality tests                 ~5 min
#   build        random-weight Llama-2-70B and OPT-66B checkpoints into CKPT (~140 GB and ~132 GB
#                of bf16 on disk; several minutes each: run once per machine)                    ~8 min
#   llama70b     Llama-2-70B (8 KV heads), TP=$TP: tiered, gpu and stateless on the scaled synthetic
#                ShareGPT workload, the same GPU KV budget per GPU ($GPU_KV_GB GB) for every system ~9 min
#   opt66b       the same for OPT-66B (MHA)                                                          ~9 min
#   engine       decode steps at batch 1/8/32 against the per-GPU weight-read floor (the all-reduce's
#                share from a per-kernel profile), prefill against the bf16 peak, swap-in GB/s on
#                rank 0's link (each GPU has its own: the aggregate is TP times it), Llama-2-70B    ~6 min
#   dry-run      the harness on this machine's CPU: the tiny demo model with TP=2 over gloo       ~2 min
#
# TP (default 4; 2 on two H200s, where 70B in bf16 fits with room for KV), GPU_KV_GB (default 40, the
# paper's budget; per GPU) and CPU_KV_GB (default 64, per GPU) shape the runs. Rates: RATES_70B and
# RATES_66B (conversations/s). Output: OUT/SUBCOMMAND/ with run.txt; environment: benchmarks/common.sh.

source "$(dirname "$0")/common.sh"

TP=${TP:-4}
GPU_KV_GB=${GPU_KV_GB:-40}
CPU_KV_GB=${CPU_KV_GB:-64}
SCALED=(--no-progress --think-time 6 --output-mean 41 --input-mean 37.77 --duration 45 --time-limit 50
        --warmup 20 --bounds 0.05,0.1,0.2,0.4 --stop-above 0.4)

mt() {  # mt SECONDS DIR ARGS...
  local seconds=$1 dir=$2
  shift 2
  echo "[$(date +%T)] multiturn.py $* -> $dir"
  limit "$seconds" "$PYTHON" benchmarks/multiturn.py "$@" --out "$dir"
}

name=${1:-}
[ -n "$name" ] && shift
case "$name" in
  ""|-h|--help|help) usage "$0"; exit 0 ;;
esac
dir="$OUT/$name"
stamp "$dir" "$name" "$@"
case "$name" in
  tests)
    PENSIEVE_TEST_DEVICE=cuda limit 400 "$PYTHON" -m pytest -q -p no:cacheprovider tests/distributed "$@" 2>&1 \
      | tee "$dir/tests_tp.txt"
    PENSIEVE_TEST_DEVICE=cuda limit 150 "$PYTHON" -m pytest -q -p no:cacheprovider \
      tests/engine/test_conversation_cache.py 2>&1 | tail -5 | tee "$dir/tests_cache.txt" ;;
  build)
    for shape in llama-2-70b opt-66b; do
      arch=llama; [ "${shape#opt}" != "$shape" ] && arch=opt
      limit 280 "$PYTHON" -c "import torch; from pensieve.model.random_checkpoint import make_random_checkpoint; \
make_random_checkpoint('$CKPT/$shape', '$arch', size='$shape', dtype=torch.bfloat16, seed=0, device='cuda')" 2>&1 | tail -3
    done ;;
  llama70b)
    mt 560 "$dir" --model-shape llama-2-70b --checkpoint-dir "$CKPT/llama-2-70b" "${SCALED[@]}" \
      --systems tiered,gpu,stateless --rates "${RATES_70B:-2,4}" --tensor-parallel-size "$TP" \
      --gpu-kv-gb "$GPU_KV_GB" --cpu-kv-gb "$CPU_KV_GB" "$@" ;;
  opt66b)
    mt 560 "$dir" --model-shape opt-66b --checkpoint-dir "$CKPT/opt-66b" "${SCALED[@]}" \
      --systems tiered,gpu,stateless --rates "${RATES_66B:-2,4}" --tensor-parallel-size "$TP" \
      --gpu-kv-gb "$GPU_KV_GB" --cpu-kv-gb "$CPU_KV_GB" "$@" ;;
  engine)
    limit 560 "$PYTHON" benchmarks/engine_bench.py --models llama-2-70b --ckpt-dir "$CKPT" --keep-ckpt \
      --tensor-parallel-size "$TP" --decode-batches 1,8,32 --profile --swap-variants dma --out "$dir" "$@" ;;
  dry-run)
    limit 300 "$PYTHON" benchmarks/multiturn.py --quick --systems tiered,stateless --tensor-parallel-size 2 \
      --rates 1 --duration 8 --out "$dir" "$@" ;;
  *) echo "unknown subcommand $name (see --help)" >&2; exit 2 ;;
esac
status=$?
pack "$dir"
exit $status
