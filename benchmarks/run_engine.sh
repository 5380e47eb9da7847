#!/usr/bin/env bash
# The engine tables of docs/BENCHMARKS.md (benchmarks/engine_bench.py): prefill against the bf16 peak,
# decode steps against the weight-read floor, swap-ins against PCIe, Pensieve against HF generate_batch.
# One named subcommand per table, each sized to end inside a 10-minute call on one H100 (checkpoint
# build included: 30-45 s for a 13B shape).
#
#   bash benchmarks/run_engine.sh SUBCOMMAND [extra engine_bench.py options]     (--help: this text)
#
#   llama8b          Llama-3.1-8B: prefill (1 x 4096, 8 x 1024), decode steps at batch 1/8/32/64 over
#                    1k tokens, HF transformers' generate_batch on the same 64 requests            ~6 min
#   llama13b-gqa10   Llama-2-13B with 10 KV heads: prefill, decode at batch 1-64 over 128 and 1k    ~7 min
#   llama13b         Llama-2-13B (MHA): the same                                                    ~7 min
#   opt13b           OPT-13B (MHA): decode at batch 1/8/32 over 128 and 1k tokens                    ~5 min
#   swap             Llama-3.1-8B: swap-ins of 1k/2k/4k tokens by the copy engines, GB/s against
#                    PCIe and this host's pinned-copy ceiling, share hidden behind a prefill         ~5 min
#   linear-ab        Llama-3.1-8B decode at batch 1-64 with the small-batch linear, then with cuBLAS
#                    (PENSIEVE_SMALL_BATCH_LINEAR=0), one machine                                   ~6 min
#
# Output: OUT/SUBCOMMAND/ (OUT defaults to benchmarks/results/run-DATE) with run.txt (commit, device,
# versions), engine.json (every row, with the device and the command) and engine.md (the table);
# linear-ab writes kernel/ and cublas/. Add --profile for a per-kernel profile of each decode graph.
# Environment: see benchmarks/common.sh (OUT, PYTHON, CKPT, TIMEOUTS, PACK).

source "$(dirname "$0")/common.sh"

eb() { run_py "$1" "$2" engine_bench.py --ckpt-dir "$CKPT" "${@:3}"; }  # eb SECONDS DIR ARGS...: one run into DIR

name=${1:-}
[ -n "$name" ] && shift
case "$name" in
  ""|-h|--help|help) usage "$0"; exit 0 ;;
  llama8b|llama13b-gqa10|llama13b|opt13b|swap|linear-ab) ;;
  *) echo "unknown subcommand: $name (see --help)" >&2; exit 2 ;;
esac
dir="$OUT/$name"
stamp "$dir" "$name" "$@"
case "$name" in
  llama8b)
    eb 560 "$dir" --models llama-3.1-8b --hf --swap-variants "" "$@" ;;
  llama13b-gqa10)
    eb 560 "$dir" --models llama-2-13b-gqa10 --decode-ctx 128,1024 --swap-variants "" "$@" ;;
  llama13b)
    eb 560 "$dir" --models llama-2-13b --decode-ctx 128,1024 --swap-variants "" "$@" ;;
  opt13b)
    eb 560 "$dir" --models opt-13b --skip-prefill --decode-batches 1,8,32 --decode-ctx 128,1024 \
      --swap-variants "" "$@" ;;
  swap)
    eb 560 "$dir" --models llama-3.1-8b --skip-prefill --decode-batches "" --swap-variants dma "$@" ;;
  linear-ab)
    eb 300 "$dir/kernel" --models llama-3.1-8b --skip-prefill --swap-variants "" --keep-ckpt "$@"
    PENSIEVE_SMALL_BATCH_LINEAR=0 eb 240 "$dir/cublas" --models llama-3.1-8b --skip-prefill --swap-variants "" "$@" ;;
esac
status=$?
echo "[$(date +%T)] $name done (exit $status): $dir"
pack "$dir"
exit $status
