"""benchmarks/engine_bench.py under tensor parallelism, as a CPU dry run: two ranks over gloo, the tiny random
Llama. The floors are per GPU, every decode row carries the cost of reaching the other rank, and what cannot
run under TP is skipped with its reason rather than hanging or crashing."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tp2_run(tmp_path_factory, tiny_path) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("engine-tp2")
    cmd = [sys.executable, str(ROOT / "benchmarks" / "engine_bench.py"), "--models", "tiny", "--device", "cpu",
           "--dtype", "float32", "--tensor-parallel-size", "2", "--prefill", "32x2", "--decode-batches", "1,4",
           "--decode-ctx", "16", "--profile", "--swap-variants", "dma", "--swap-tokens", "64,128",
           "--gpu-kv-gb", "0.01", "--cpu-kv-gb", "0.01", "--hf", "--hf-requests", "2", "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((out / "engine.json").read_text()), out


def rows_of(result: dict, kind: str) -> list[dict]:
    return [r for r in result["rows"] if r["kind"] == kind]


def test_floors_are_per_gpu(tp2_run):
    result, _ = tp2_run
    assert result["tensor_parallel_size"] == 2 and result["device"] == "2 x cpu"
    [prefill] = rows_of(result, "prefill")
    assert prefill["peak_tflops"] == pytest.approx(2 * 793.0)
    decode = rows_of(result, "decode")
    assert [r["batch"] for r in decode] == [1, 4]
    for r in decode:
        # rank 0 holds half of the float32 weights (norms whole on both ranks: a fraction of a percent more)
        whole = r["params_b"] * 1e9 * 4
        assert whole / 2 <= r["weight_gb_per_gpu"] * 1e9 < whole / 2 * 1.01
        assert r["weight_floor_ms"] == pytest.approx(r["weight_gb_per_gpu"] * 1e9 / 3.0e12 * 1e3)
        assert r["running"] == r["batch"] and r["ms"] > 0


def test_decode_rows_carry_the_cost_of_reaching_the_other_rank(tp2_run):
    result, out = tp2_run
    for r in rows_of(result, "decode"):
        assert 0 < r["rank_message_ms"] < r["ms"] and 0 < r["rank_message_share"] < 1
        # the profile of rank 0 finds the model's all-reduces (gloo on the CPU, NCCL kernels on GPUs)
        assert 0 < r["allreduce_ms"] <= r["collectives_ms"] and 0 < r["allreduce_share_step"] < 1
        assert r["graph_ms"] is None
        assert "| all-reduce |" in (out / f"decode_profile_b{r['batch']}_ctx16.md").read_text()


def test_swap_ins_per_gpu_and_in_all(tp2_run):
    result, _ = tp2_run
    swaps = rows_of(result, "swap_ranks")
    assert [r["tokens"] for r in swaps] == [64, 128]
    for r in swaps:
        assert r["gbps_per_gpu"] > 0 and r["gbps_aggregate"] == pytest.approx(2 * r["gbps_per_gpu"])


def test_what_cannot_run_under_tp_is_skipped_with_its_reason(tp2_run):
    result, out = tp2_run
    assert set(result["skipped"]) == {"swap overlap and copy variants", "HF transformers generate_batch"}
    assert "runs the model on one GPU" in result["skipped"]["HF transformers generate_batch"]
    assert rows_of(result, "pensieve_batch") and not rows_of(result, "hf_generate_batch")
    report = (out / "engine.md").read_text()
    assert "Skipped:" in report and "Tensor parallel over 2 ranks" in report
