"""Tensor parallelism: on the CPU the ranks are processes talking over gloo, as NCCL ranks do on GPUs.

Greedy tokens under TP equal TP=1's token for token (float32), with the sampled tokens' logprobs within
a tolerance (the all-reduce sums in another order); the two-tier cache under TP, with pools small enough
to force swaps and drops, equals stateless serving; a rank that dies ends the engine with an error
naming it, never a hang. With PENSIEVE_TEST_DEVICE=cuda the same tests run on GPUs (NCCL, CUDA graphs
with the all-reduce captured, the copy streams of every rank); a test needing more GPUs than visible
is skipped.
"""
from __future__ import annotations

import os
import signal
import time

import pytest
import torch

from pensieve.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from pensieve.distributed.executor import RankFailure
from pensieve.engine.llm_engine import LLMEngine
from pensieve.sampling_params import SamplingParams
from tests.engine.workload import converse, run_all

LOGPROB_TOL = 1e-4
DEVICE = os.environ.get("PENSIEVE_TEST_DEVICE", "cpu")


def make_engine(path, tp: int, mode: str = "stateless", gpu: int = 256, cpu: int = 0, cache_path=None,
                **kw) -> LLMEngine:
    if DEVICE == "cuda" and torch.cuda.device_count() < tp:
        pytest.skip(f"needs {tp} GPUs")
    return LLMEngine(EngineConfig(
        model=ModelConfig(model=str(path), max_model_len=256),
        cache=CacheConfig(block_size=4, cache_mode=mode, num_gpu_blocks=gpu, num_cpu_blocks=cpu,
                          swap_out_watermark=0.5, persist_path=None if cache_path is None else str(cache_path)),
        scheduler=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=48),
        device=DEVICE, enforce_eager=DEVICE == "cpu", tensor_parallel_size=tp, **kw))


def reference(path) -> tuple[dict, dict]:
    engine = make_engine(path, 1)
    logprobs: dict = {}
    return converse(engine, num_convs=4, num_turns=3, logprobs=logprobs), logprobs


def check_equal(got, got_lp, want, want_lp) -> None:
    for key, (tokens, _) in want.items():
        assert got[key][0] == tokens, f"diverged at {key}"
        worst = max(abs(a - b) for a, b in zip(got_lp[key], want_lp[key]))
        assert worst < LOGPROB_TOL, f"logprobs at {key} differ by {worst}"


# Every architecture family and its sharding corners: GQA with KV heads split (llama), one KV head
# replicated on every rank (mistral), per-head q/k norms (qwen3), tied embeddings with biases on every
# projection (row-parallel biases added once), OPT's learned positions, post-norm and projections.
@pytest.mark.parametrize("variant", ["llama", "mistral", "qwen3", "llama-tied-mha-bias", "opt-postnorm-proj"])
def test_two_ranks_tiered_equal_one_rank_stateless(tiny_checkpoint, variant):
    path = tiny_checkpoint(variant)
    want, want_lp = reference(path)
    # tiered with tight pools (swaps, drops, deferred swap-ins) and async scheduling (token ids sampled on
    # rank 0's device reach the other rank by a broadcast)
    engine = make_engine(path, 2, "tiered", gpu=24, cpu=12, async_scheduling=True)
    try:
        got_lp: dict = {}
        got = converse(engine, num_convs=4, num_turns=3, logprobs=got_lp)
        check_equal(got, got_lp, want, want_lp)
        s = engine.stats()
        assert s.swapped_in_blocks > 0 and s.dropped_blocks > 0 and s.steps_overlapped > 0
        assert s.rank_messages > 0 and s.rank_message_seconds > 0
        if DEVICE == "cuda":   # decode steps replayed CUDA graphs with the all-reduces inside
            assert s.steps_graph > 0
        engine.check_integrity()
    finally:
        engine.shutdown()


@pytest.mark.parametrize("variant", ["llama", "opt"])
def test_four_ranks_equal_one_rank(tiny_checkpoint, variant):
    """Four ranks: llama's two KV heads are each replicated on two ranks; OPT keeps one head per rank."""
    path = tiny_checkpoint(variant)
    want, want_lp = reference(path)
    engine = make_engine(path, 4, "tiered", gpu=24, cpu=12)
    try:
        got_lp: dict = {}
        check_equal(converse(engine, num_convs=4, num_turns=3, logprobs=got_lp), got_lp, want, want_lp)
    finally:
        engine.shutdown()
    assert all(not p.is_alive() for p in engine.executor.rank_processes)


def test_a_killed_rank_ends_the_engine_with_an_error_naming_it(tiny_checkpoint):
    engine = make_engine(tiny_checkpoint("llama"), 2)
    try:
        engine.add_request("long", list(range(10, 40)), SamplingParams(temperature=0, max_tokens=200, ignore_eos=True))
        for _ in range(3):
            engine.step()
        [worker] = engine.executor.rank_processes
        os.kill(worker.pid, signal.SIGKILL)
        start = time.monotonic()
        with pytest.raises(RankFailure, match="rank 1 exited with code -9"):
            for _ in range(1000):
                engine.step()
        assert time.monotonic() - start < 30
        with pytest.raises(RankFailure):   # and it stays failed: no step pretends to work
            engine.step()
    finally:
        engine.shutdown()


def test_a_rank_that_cannot_start_fails_the_engine_at_once(tiny_checkpoint):
    """A shape that cannot be sharded (4 heads over 3 ranks) is refused with the reason, all ranks torn down."""
    with pytest.raises(ValueError, match="not divisible by the tensor-parallel size 3"):
        make_engine(tiny_checkpoint("llama"), 3)


def test_one_rank_has_no_other_process_and_no_group(tiny_checkpoint):
    import torch.distributed as dist

    engine = make_engine(tiny_checkpoint("llama"), 1)
    assert engine.executor is engine.runner and not dist.is_initialized()
    engine.add_request("a", [5, 6, 7], SamplingParams(temperature=0, max_tokens=2))
    assert run_all(engine)["a"].finished


def test_the_saved_cache_round_trips_under_two_ranks(tiny_checkpoint, tmp_path):
    """Each rank saves and verifies its own KV heads; a block damaged in rank 1's shard alone is dropped
    on every rank (the union of bad blocks), and answers equal stateless serving."""
    from pensieve.cache import persist

    path, saved = tiny_checkpoint("llama"), tmp_path / "kv"
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    first = list(range(20, 53))
    reference = make_engine(path, 1)
    reference.add_request("t1", first + [7, 8, 9], params)
    want = run_all(reference)["t1"].outputs[0].token_ids

    engine = make_engine(path, 2, "tiered", gpu=64, cpu=64, cache_path=saved)
    engine.add_request("t0", first, params, conversation_id="c")
    run_all(engine)
    engine.close([])                                   # saves, then stops both ranks
    save = persist.open_save(saved)[0]
    assert sorted(p.name for p in save.glob("kv.*.bin")) == ["kv.0.bin", "kv.1.bin"]
    shard = save / "kv.1.bin"
    record = shard.stat().st_size // len(persist.open_save(saved)[1]["keys"])
    raw = bytearray(shard.read_bytes())
    raw[record // 2] ^= 0xFF                            # rank 1's copy of the first saved block only
    shard.write_bytes(bytes(raw))

    engine = make_engine(path, 2, "tiered", gpu=64, cpu=64, cache_path=saved)
    try:
        assert engine.kv.num_used_cpu == len(persist.open_save(saved)[1]["keys"]) - 1
        engine.add_request("t1", first + [7, 8, 9], params)
        out = run_all(engine)["t1"]
        assert out.outputs[0].token_ids == want and out.cache.cpu_hit_tokens > 0
    finally:
        engine.shutdown()
    one_rank = make_engine(path, 1, "tiered", gpu=64, cpu=64, cache_path=saved)   # another layout: logged, empty
    assert one_rank.kv.num_used_cpu == 0


def test_the_async_engine_stops_when_a_rank_dies(tiny_checkpoint):
    """Behind the server: the request in flight fails with the rank named, the engine reports not alive
    (so /health answers 503), and no rank process is left."""
    import asyncio

    from pensieve.engine.async_engine import AsyncEngine

    config = EngineConfig(model=ModelConfig(model=str(tiny_checkpoint("llama")), max_model_len=256),
                          cache=CacheConfig(block_size=4, num_gpu_blocks=64, num_cpu_blocks=16),
                          device=DEVICE, enforce_eager=True, tensor_parallel_size=2)
    if DEVICE == "cuda" and torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    engine = AsyncEngine(config)
    [worker] = engine.engine.executor.rank_processes

    async def main() -> None:
        params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
        async for _ in engine.generate("fine", list(range(10, 40)), params):
            pass
        os.kill(worker.pid, signal.SIGKILL)
        with pytest.raises(RuntimeError, match="rank 1"):
            async for _ in engine.generate("doomed", list(range(10, 40)), params):
                pass
        for _ in range(100):
            if not engine.alive:
                break
            await asyncio.sleep(0.05)
        assert not engine.alive
        await engine.shutdown()

    asyncio.run(main())
    assert not worker.is_alive()


def test_metrics_count_the_step_messages_to_the_other_ranks(tiny_checkpoint):
    """A real server at TP=2 driven by the openai client: /metrics counts rank 0's step messages to the other
    rank and the seconds they took, as EngineStats does; when the server stops, so does the rank."""
    for module in ("fastapi", "uvicorn", "openai"):  # the server's extras (not on every GPU image)
        pytest.importorskip(module)
    import httpx
    from openai import OpenAI
    from prometheus_client.parser import text_string_to_metric_families

    from pensieve.engine.async_engine import AsyncEngine
    from pensieve.server.app import build_app
    from pensieve.server.settings import ServerSettings
    from tests.loopback import free_port, serve_in_thread

    if DEVICE == "cuda" and torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    engine = AsyncEngine(EngineConfig(model=ModelConfig(model=str(tiny_checkpoint("llama")), max_model_len=256),
                                      cache=CacheConfig(block_size=4, num_gpu_blocks=64, num_cpu_blocks=16),
                                      device=DEVICE, enforce_eager=DEVICE == "cpu", tensor_parallel_size=2))
    [worker] = engine.engine.executor.rank_processes
    port = free_port()

    def scrape(url: str) -> dict[str, float]:
        families = text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=30).text)
        return {s.name: s.value for f in families for s in f.samples if s.name.startswith("pensieve_rank_")}

    with serve_in_thread(build_app(engine, ServerSettings(port=port, served_model_names=("tiny",))), port) as url:
        before = scrape(url)
        client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
        out = client.completions.create(model="tiny", prompt="tensor parallel metrics", max_tokens=5, temperature=0,
                                        extra_body={"ignore_eos": True})
        assert out.usage.completion_tokens == 5
        after = scrape(url)
        stats = engine.stats()
    # one message per step: a prefill and four decode steps at least
    assert after["pensieve_rank_messages_total"] >= before["pensieve_rank_messages_total"] + 5
    assert after["pensieve_rank_message_seconds_total"] > before["pensieve_rank_message_seconds_total"]
    assert stats.rank_messages >= after["pensieve_rank_messages_total"] > 0
    worker.join(timeout=30)
    assert not worker.is_alive()
