#!/usr/bin/env bash
# The kernel tables of docs/BENCHMARKS.md: the attention kernel against SDPA and the HBM roofline, the
# small-batch linear against cuBLAS, block copies against PCIe (benchmarks/kernel_bench.py), and the
# prefill launch evidence (benchmarks/prefill_probe.py). Llama-3-8B heads (32 q / 8 KV, d128) unless
# named, bf16, KV in shuffled 16-token pages. Each subcommand ends inside a 10-minute call on one H100.
#
#   bash benchmarks/run_kernels.sh SUBCOMMAND [extra options of the script it runs]   (--help: this text)
#
#   attention        prefill (engine path and gathered) vs SDPA; decode at batch 1-64 x 4k-32k as a
#                    share of 3.0 TB/s, KV rotated past L2 (kernel_bench prefill,decode)            ~3 min
#   decode-sweep     decode launches (splits, tiles, stages, PDL) replayed round-robin, and the
#                    plain-read floor of the same bytes (kernel_bench decode_sweep,read_floor)       ~5 min
#   linear           the decode step's weight shapes at 1-64 rows: the small-batch linear vs cuBLAS
#                    (kernel_bench linear_sweep)                                                    ~4 min
#   copy             every kernel against its PyTorch reference, then host<->device block copies
#                    (kernel_bench correctness,copy)                                                ~3 min
#   prefill-probe    ours beside a dense causal flash attention in plain Triton and SDPA, at each
#                    launch configuration, and new turns over cached context (prefill_probe.py)     ~4 min
#   launch-rule      choose_config's small-prompt launch vs the default on 40/10 heads, MHA and
#                    groups of 8 (prefill_probe.py --rule)                                          ~4 min
#   launch-rule-mha  the same for MHA (32/32, 40/40) past its threshold and over context (--rule-mha) ~5 min
#   sass             per-tile SASS instruction mix of the attention kernel for sm_90 (sass_loops.py;
#                    any machine, no GPU: Triton ships ptxas)                                       <1 min
#
# Output: OUT/SUBCOMMAND/ (OUT defaults to benchmarks/results/run-DATE) with run.txt (commit, device,
# versions) and kernel_bench.{json,md} or prefill_probe.{json,md} (one row per measurement, the device in
# each kernel_bench row), or sass.txt.
# Environment: see benchmarks/common.sh (OUT, PYTHON, TIMEOUTS, PACK).

source "$(dirname "$0")/common.sh"

kb() { run_py "$1" "$2" kernel_bench.py --sections "$3" "${@:4}"; }  # kb SECONDS DIR SECTIONS ARGS...
probe() { run_py "$1" "$2" prefill_probe.py "${@:3}"; }              # probe SECONDS DIR ARGS...

name=${1:-}
[ -n "$name" ] && shift
case "$name" in
  ""|-h|--help|help) usage "$0"; exit 0 ;;
  attention|decode-sweep|linear|copy|prefill-probe|launch-rule|launch-rule-mha|sass) ;;
  *) echo "unknown subcommand: $name (see --help)" >&2; exit 2 ;;
esac
dir="$OUT/$name"
stamp "$dir" "$name" "$@"
case "$name" in
  attention)       kb 400 "$dir" prefill,decode "$@" ;;
  decode-sweep)    kb 560 "$dir" decode_sweep,read_floor "$@" ;;
  linear)          kb 500 "$dir" linear_sweep "$@" ;;
  copy)            kb 400 "$dir" correctness,copy "$@" ;;
  prefill-probe)   probe 500 "$dir" "$@" ;;
  launch-rule)     probe 500 "$dir" --rule "$@" ;;
  launch-rule-mha) probe 560 "$dir" --rule-mha "$@" ;;
  sass)
    for args in "" "--context" "--decode"; do
      echo "== sass_loops.py $args $*"
      # shellcheck disable=SC2086  # $args is one flag or none
      "$PYTHON" benchmarks/sass_loops.py $args "$@"
    done > "$dir/sass.txt"
    cat "$dir/sass.txt" ;;
esac
status=$?
echo "[$(date +%T)] $name done (exit $status): $dir"
pack "$dir"
exit $status
