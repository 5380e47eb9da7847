#!/usr/bin/env bash
# The correctness tests that need a GPU, run on CUDA: every Triton kernel against its PyTorch reference,
# the models, the sampler, async scheduling, and the conversation cache's cached == uncached outputs under
# swaps, drops and preemption (PENSIEVE_TEST_DEVICE=cuda). Run it before measuring new code.
#
#   bash benchmarks/gpu_check.sh [pytest paths or options]     (--help: this text; ~5 min on one H100)
#
# Without arguments: tests/kernels, tests/model/test_models_gpu.py and tests/engine/test_{conversation_cache,
# async_scheduling,sampler}.py. Output: OUT/gpu-check/ (OUT defaults to
# benchmarks/results/run-DATE) with run.txt (commit, device, versions) and gpu_tests.txt (pytest's
# report; the device and versions are printed first).
# Environment: see benchmarks/common.sh (OUT, PYTHON, TIMEOUTS, PACK).

source "$(dirname "$0")/common.sh"

case "${1:-}" in
  -h|--help|help) usage "$0"; exit 0 ;;
esac
TESTS=(tests/kernels tests/model/test_models_gpu.py tests/engine/test_conversation_cache.py
       tests/engine/test_async_scheduling.py tests/engine/test_sampler.py)
[ $# -gt 0 ] && TESTS=("$@")
dir="$OUT/gpu-check"
stamp "$dir" gpu-check "${TESTS[@]}"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$PYTHON" -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
  PENSIEVE_TEST_DEVICE=cuda limit 560 "$PYTHON" -m pytest -q -p no:cacheprovider "${TESTS[@]}"
} 2>&1 | tee "$dir/gpu_tests.txt"
status=${PIPESTATUS[0]}
echo "[$(date +%T)] gpu-check done (exit $status): $dir"
pack "$dir"
exit "$status"
