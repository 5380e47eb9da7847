"""Tiny end-to-end runs: the in-process engine (direct and through the CLI) and a tiny-model server over HTTP."""
from __future__ import annotations

import argparse
import asyncio
import json

import pytest

from pensieve.bench.backends import Backend, EngineBackend, HttpBackend, parse_system
from pensieve.bench.cli import add_bench_arguments, bench_async, engine_config
from pensieve.bench.datasets import SHAREGPT_SPEC, generate_synthetic, vocab_ids_of
from pensieve.bench.records import TurnRequest, TurnResult
from pensieve.bench.runner import run_schedule
from pensieve.bench.workload import WorkloadConfig, build_schedule


class Recording(Backend):
    """Wraps a backend and keeps every request it was asked."""

    def __init__(self, inner: Backend) -> None:
        self.inner = inner
        self.name = inner.name
        self.requests: list[TurnRequest] = []
        self.results: list[TurnResult] = []

    async def start(self) -> None:
        await self.inner.start()
        self.tokenizer, self.max_model_len = self.inner.tokenizer, self.inner.max_model_len

    async def submit(self, req: TurnRequest) -> TurnResult:
        self.requests.append(req)
        res = await self.inner.submit(req)
        self.results.append(res)
        return res

    async def stats(self):
        return await self.inner.stats()

    async def end_conversation(self, conversation_id: str) -> None:
        await self.inner.end_conversation(conversation_id)

    async def close(self) -> None:
        await self.inner.close()


def _schedule(tokenizer, n: int = 3, seed: int = 0):
    convs = generate_synthetic(SHAREGPT_SPEC, n, vocab_ids_of(tokenizer), seed=seed, max_input_tokens=8,
                               max_output_tokens=12)
    return build_schedule(convs, WorkloadConfig(rate=20.0, think_time_mean=0.01, duration=None,
                                                max_conversations=n, seed=seed))


def _check_turn_chain(rec: Recording) -> None:
    """Turn n+1's prompt = turn n's prompt + its exact reply ids + new user ids; replies have the forced length."""
    by_conv: dict[str, list[tuple[TurnRequest, TurnResult]]] = {}
    for req, res in zip(rec.requests, rec.results):
        by_conv.setdefault(req.conversation_id, []).append((req, res))
    multi = 0
    for pairs in by_conv.values():
        pairs.sort(key=lambda p: p[0].turn_index)
        for (req, res), (nxt, _) in zip(pairs, pairs[1:]):
            head = list(req.prompt_token_ids) + res.output_token_ids
            assert list(nxt.prompt_token_ids[:len(head)]) == head
            assert len(nxt.prompt_token_ids) > len(head)
            multi += 1
        for req, res in pairs:
            assert res.ok and res.output_tokens == req.max_tokens == len(res.output_token_ids)
    assert multi > 0, "the workload needs a multi-turn conversation"


def test_engine_backend_runs_turns(tiny_path):
    from pensieve.config import CacheConfig, EngineConfig, ModelConfig

    async def main():
        cfg = EngineConfig(model=ModelConfig(model=tiny_path, dtype="float32", max_model_len=512),
                           cache=CacheConfig(num_gpu_blocks=64, num_cpu_blocks=64, cache_mode="tiered"), device="cpu")
        rec = Recording(EngineBackend("tiered", cfg))
        await rec.start()
        try:
            run = await run_schedule(rec, _schedule(rec.tokenizer), encode=None, progress=False)
            stats = await rec.stats()
            for cid in {r.conversation_id for r in rec.requests}:
                await rec.end_conversation(cid)
        finally:
            await rec.close()
        return rec, run, stats

    rec, run, stats = asyncio.run(main())
    assert run.truncated_turns == 0 and len(run.records) == run.planned_turns
    _check_turn_chain(rec)
    later = [r for r in run.records if r.turn_index > 0]
    # each later turn reuses (at least) the full blocks of its history's KV: the previous prompt and reply
    # minus the last reply token, whose KV is never computed
    assert later and all(r.cached_tokens > 0 for r in later)
    prev = {(r.conversation_id, r.turn_index): r for r in run.records}
    for r in later:
        p = prev[(r.conversation_id, r.turn_index - 1)]
        assert r.cached_tokens >= 16 * ((p.prompt_tokens + p.output_tokens - 1) // 16)
    assert all(r.ttft is not None and 0 <= r.ttft <= r.e2e for r in run.records)
    assert stats["finished_requests"] >= run.planned_turns
    assert min(r.send_time for r in run.records) >= 0


def _bench_args(tmp_path, *extra: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_bench_arguments(parser)
    return parser.parse_args([
        "--rates", "5,20", "--max-conversations", "3", "--duration", "0", "--think-time", "0.01",
        "--max-input-tokens", "8", "--max-output-tokens", "5", "--num-gpu-blocks-override", "64", "--num-cpu-blocks", "64",
        "--max-model-len", "512", "--dtype", "float32", "--device", "cpu", "--no-progress", "--save-records",
        "--bounds", "0.5,5", "--out", str(tmp_path), *extra])


def test_cli_engine_systems_side_by_side(tmp_path, tiny_path):
    args = _bench_args(tmp_path, "--systems", "tiered,stateless", "--model", tiny_path,
                       "--profile-steps", "2", "--profile-after", "0")
    results = asyncio.run(bench_async(args))
    assert results["systems"] == ["tiered", "stateless"] and not results["errors"]
    assert results["device"] == "cpu"
    for system in ("tiered", "stateless"):
        assert len(results["points"][system]) == 2
        for p in results["points"][system]:
            assert p["summary"]["num_requests"] == p["run"]["planned_turns"] > 0
            assert p["summary"]["num_errors"] == 0
    hit = [p["summary"]["cache"]["hit_rate"] for p in results["points"]["tiered"]]
    assert all(h > 0 for h in hit)
    assert all(p["summary"]["cache"]["hit_rate"] == 0 for p in results["points"]["stateless"])
    # both systems saw the same workload: same turns with the same prompt lengths
    recs = [json.loads(line) for line in (tmp_path / "records.jsonl").read_text().splitlines()]
    shapes = {s: sorted((r["request_id"], r["prompt_tokens"], r["output_tokens"]) for r in recs
                        if r["point"].startswith(s + "@")) for s in ("tiered", "stateless")}
    assert shapes["tiered"] == shapes["stateless"]
    data = json.loads((tmp_path / "results.json").read_text())
    assert set(data["tiered_vs_stateless"]["mean"]) == {"0.5", "5"}
    assert (tmp_path / "summary.md").exists() and (tmp_path / "latency.png").exists()
    assert data["workload"]["think_time_mean_s"] == 0.01 and data["kv_budget"]["num_gpu_blocks"] == 64
    # --profile-steps: each point carries a torch.profiler window of the engine's steps
    assert all(p["profile"].startswith("2 steps in ") for s in ("tiered", "stateless") for p in data["points"][s])


def test_parse_system_variants():
    s = parse_system("tiered-lru-noaot")
    assert s.kind == "engine" and s.cache_mode == "tiered"
    assert dict(s.overrides) == {"eviction_policy": "lru", "ahead_of_time_swap_out": False}
    s = parse_system("tiered-sync")
    assert s.overrides == () and dict(s.engine_overrides) == {"async_scheduling": False}
    parser = argparse.ArgumentParser()
    add_bench_arguments(parser)
    args = parser.parse_args(["--async-scheduling"])
    budget = {"num_gpu_blocks": 64, "num_cpu_blocks": 32}
    assert engine_config(s, args, "m", budget).async_scheduling is False          # the suffix wins
    assert engine_config(parse_system("tiered"), args, "m", budget).async_scheduling is True
    dma = engine_config(parse_system("tiered-dmadefer"), args, "m", budget)
    assert dma.cache.swap_dma_deferred is True and engine_config(s, args, "m", budget).cache.swap_dma_deferred is False
    assert parse_system("transformers").kind == "transformers"
    assert parse_system("http").kind == "http"
    with pytest.raises(ValueError):
        parse_system("vllm")
    with pytest.raises(ValueError):
        parse_system("tiered-fast")


def test_http_backend_against_a_tiny_model_server(tiny_server, tiny_path):
    async def main():
        rec = Recording(HttpBackend("http", tiny_server, tokenizer_path=tiny_path))
        await rec.start()
        try:
            before = await rec.stats()
            run = await run_schedule(rec, _schedule(rec.tokenizer, seed=3), progress=False)
            after = await rec.stats()
        finally:
            await rec.close()
        return rec, run, before, after

    rec, run, before, after = asyncio.run(main())
    assert rec.max_model_len == 512
    assert rec.inner.history_ids == "exact"  # the server returns token ids: turns append them verbatim
    assert run.truncated_turns == 0 and len(run.records) == run.planned_turns
    assert all(r.ok and r.output_tokens == q.max_tokens for q, r in zip(rec.requests, rec.results))
    assert all(r.ttft is not None and r.ttft <= r.e2e for r in run.records)
    # later turns resend the history as token ids: the server reports cached tokens, split by tier
    later = [r for r in run.records if r.turn_index > 0]
    assert later and all(r.cached_tokens > 0 and r.gpu_hit_tokens + r.cpu_hit_tokens == r.cached_tokens
                         for r in later)
    assert before is not None and after is not None
    key = "pensieve_finished_requests_total"
    assert after[key] - before[key] == run.planned_turns
    assert after["pensieve_prompt_tokens_total"] - before["pensieve_prompt_tokens_total"] == \
        sum(r.prompt_tokens for r in run.records)


def test_cli_http_chat_api(tmp_path, tiny_server, tiny_path):
    args = _bench_args(tmp_path, "--systems", "http", "--url", tiny_server, "--tokenizer", tiny_path,
                       "--api", "chat", "--rates", "10")
    results = asyncio.run(bench_async(args))
    assert results["systems"] == ["http"] and not results["errors"]
    s = results["points"]["http"][0]["summary"]
    assert s["num_requests"] > 0 and s["num_errors"] == 0 and s["output_tokens"] > 0


def test_transformers_backend_is_stateless_reference(tiny_path):
    from pensieve.bench.backends import TransformersBackend

    async def main():
        rec = Recording(TransformersBackend("transformers", tiny_path, dtype="float32", device="cpu",
                                            num_kv_tokens=1024, page_size=16))
        await rec.start()
        try:
            run = await run_schedule(rec, _schedule(rec.tokenizer, seed=5), progress=False)
        finally:
            await rec.close()
        return rec, run

    rec, run = asyncio.run(main())
    assert run.truncated_turns == 0 and len(run.records) == run.planned_turns
    _check_turn_chain(rec)
    assert all(r.cached_tokens == 0 and r.ttft is not None and r.ttft <= r.e2e for r in run.records)


def test_cli_real_dataset_file(tmp_path, tiny_path):
    lines = [json.dumps({"id": str(i), "data": [f"question {i} about caches", "an answer of some words here",
                                                 f"follow up {i}", "short reply"]}) for i in range(4)]
    data = tmp_path / "ultrachat.jsonl"
    data.write_text("\n".join(lines) + "\n")
    # ... through an engine in its own process, as `serve --engine-process` runs it
    args = _bench_args(tmp_path / "out", "--systems", "gpu", "--model", tiny_path, "--dataset", "ultrachat",
                       "--dataset-path", str(data), "--rates", "10,20", "--max-conversations", "2",
                       "--engine-process")
    results = asyncio.run(bench_async(args))
    assert not results["errors"]
    assert results["system_configs"]["gpu"]["engine_process"] is True
    pts = results["points"]["gpu"]
    assert [p["run"]["planned_turns"] for p in pts] == [4, 4]          # 2 conversations x 2 turns, disjoint per rate
    assert all(p["summary"]["num_requests"] == 4 for p in pts)
    assert results["dataset_stats"]["10"]["turns_per_conversation"] == 2


def test_transformers_backend_fails_fast_once_its_manager_died():
    """A dead continuous-batching manager must fail later turns at once, never leave them waiting."""
    from pensieve.bench.backends import TransformersBackend
    from pensieve.bench.records import TurnRequest

    backend = TransformersBackend("transformers", "unused")
    backend._dead = RuntimeError("transformers continuous batching thread stopped")
    req = TurnRequest(request_id="r", conversation_id="c", turn_index=0, prompt_token_ids=(1, 2, 3), max_tokens=4,
                      messages=())
    res = asyncio.run(asyncio.wait_for(backend.submit(req), 5))
    assert res.error is not None and "stopped" in res.error
