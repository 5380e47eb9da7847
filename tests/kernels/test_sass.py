"""The attention kernel compiled for the H100 (sm_90) on this CPU machine: Triton ships ptxas, so
the code a tile runs can be checked without a GPU (benchmarks/sass_loops.py, run in a process of
its own: under TRITON_INTERPRET, which the other kernel tests set, kernels cannot be compiled)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import triton

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(not (Path(triton.__file__).parent / "backends/nvidia/bin/ptxas").exists(),
                                reason="this Triton ships no ptxas")


def sass(*args: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks/sass_loops.py"), "--json", *args],
                         capture_output=True, text=True, env=env, timeout=300, check=True)
    return json.loads(out.stdout)


def test_prefill_tile_costs_what_a_dense_kernel_tile_costs() -> None:
    """The new-token loop of a prefill (its hot loop) does the dense flash-attention tile's math with
    at most 5% more instructions (per-tile 64-bit address arithmetic makes it 11% more).
    Its launch keeps two programs per SM (<= 128 registers, <= 114 KB of shared memory)."""
    kernels = sass()
    paged_n, paged_ops = kernels["paged prefill"]["loops"][0]
    dense_n, dense_ops = kernels["dense reference"]["loops"][0]
    for op in ("HGMMA", "MUFU", "FFMA", "FMUL"):
        assert paged_ops[op] == dense_ops[op] > 0, op
    assert paged_n <= 1.05 * dense_n, (paged_n, dense_n)
    usage = kernels["paged prefill"]["usage"]
    assert usage["registers"] <= 128 and usage["shared_bytes"] <= 114 * 1024


def test_decode_and_context_variants_compile() -> None:
    assert sass("--decode")["paged decode"]["loops"]
    assert len(sass("--context")["paged prefill"]["loops"]) == 4    # paged and new-token loops, each masked or not
