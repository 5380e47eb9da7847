#!/usr/bin/env bash
# One GPU call: environment, the engine's correctness tests on CUDA (Triton kernels, copy stream,
# per-layer events, CUDA graphs), then the engine benchmark. Results land under $OUT.
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
PENSIEVE_TEST_DEVICE=cuda timeout "${TEST_TIMEOUT:-150}" python3 -m pytest -q -x -p no:cacheprovider \
  tests/engine/test_conversation_cache.py ${EXTRA_TESTS:-tests/kernels tests/model/test_models_gpu.py tests/engine/test_sampler.py} 2>&1 | tail -25 | tee "$OUT/gpu_tests.txt"
timeout "${BENCH_TIMEOUT:-330}" python3 benchmarks/engine_bench.py --models "${MODELS:-llama-3.1-8b}" ${BENCH_ARGS:---hf} --out "$OUT/engine"
