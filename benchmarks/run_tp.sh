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
#   engine       Llama-2-70B: decode steps at batch 1/8/32 against the per-GPU weight-read floor
#                (weights / TP at 3.0 TB/s), with each step's message to the ranks and the
#                all-reduce's share from a profile of rank 0; prefill against TP x the bf16 peak;
#                swap-in GB/s per GPU (copy-only steps on every rank, timed on rank 0's link) and
#                aggregate (TP times it)                                                          ~6 min
#   dry-run      the harness on this machine's CPU, ranks over gloo: multiturn.py and then
#                engine_bench.py with the tiny random Llama at TP=2 (extra options go to
#                multiturn.py; engine_bench.py writes OUT/dry-run/engine/)                       ~2 min
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
    run_py 560 "$dir" multiturn.py --model-shape llama-2-70b --checkpoint-dir "$CKPT/llama-2-70b" "${SCALED[@]}" \
      --systems tiered,gpu,stateless --rates "${RATES_70B:-2,4}" --tensor-parallel-size "$TP" \
      --gpu-kv-gb "$GPU_KV_GB" --kv-offloading-size "$CPU_KV_GB" "$@" ;;
  opt66b)
    run_py 560 "$dir" multiturn.py --model-shape opt-66b --checkpoint-dir "$CKPT/opt-66b" "${SCALED[@]}" \
      --systems tiered,gpu,stateless --rates "${RATES_66B:-2,4}" --tensor-parallel-size "$TP" \
      --gpu-kv-gb "$GPU_KV_GB" --kv-offloading-size "$CPU_KV_GB" "$@" ;;
  engine)
    run_py 560 "$dir" engine_bench.py --models llama-2-70b --ckpt-dir "$CKPT" --keep-ckpt \
      --tensor-parallel-size "$TP" --decode-batches 1,8,32 --profile --swap-variants dma "$@" ;;
  dry-run)
    run_py 300 "$dir" multiturn.py --quick --systems tiered,stateless --tensor-parallel-size 2 --rates 1 \
      --duration 8 "$@" \
    && run_py 120 "$dir/engine" engine_bench.py --models tiny --device cpu --dtype float32 \
      --tensor-parallel-size 2 --prefill 64x4 --decode-batches 1,8 --decode-ctx 32 --profile --swap-variants dma \
      --swap-tokens 64,256 --gpu-kv-gb 0.02 --cpu-kv-gb 0.02 ;;
  *) echo "unknown subcommand $name (see --help)" >&2; exit 2 ;;
esac
status=$?
pack "$dir"
exit $status
