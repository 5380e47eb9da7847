"""The threaded engine behind the server: how outputs reach the callers' event loops."""
from __future__ import annotations

import pytest

from pensieve.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from pensieve.model.random_checkpoint import make_random_checkpoint
from pensieve.sampling_params import SamplingParams
from tests.engine.test_conversation_cache import BS, DEVICE


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> EngineConfig:
    checkpoint = make_random_checkpoint(tmp_path_factory.mktemp("llama"), "llama", seed=1, initializer_range=0.1)
    return EngineConfig(
        model=ModelConfig(model=str(checkpoint), max_model_len=256),
        cache=CacheConfig(block_size=BS, num_gpu_blocks=128, num_cpu_blocks=64),
        scheduler=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64),
        device=DEVICE, enforce_eager=DEVICE == "cpu")


def test_async_engine_wakes_each_caller_loop_once_per_step(config):
    """Outputs of one step reach an event loop in one call_soon_threadsafe (a self-pipe write and a
    GIL hand-off each), not one per running request."""
    import asyncio
    import sys

    from pensieve.engine.async_engine import AsyncEngine


    async def main() -> tuple[int, int, list[list[int]]]:
        loop = asyncio.get_running_loop()
        calls = 0
        real = loop.call_soon_threadsafe

        def counting(*args, **kw):
            nonlocal calls
            calls += 1
            return real(*args, **kw)

        engine = AsyncEngine(config)
        assert sys.getswitchinterval() <= config.gil_switch_interval_s  # the engine thread wins the GIL back fast
        loop.call_soon_threadsafe = counting
        try:
            params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)

            async def one(i: int) -> list[int]:
                tokens: list[int] = []
                async for out in engine.generate(f"r{i}", [5 + i, 6, 7, 8, 9], params):
                    tokens += out.outputs[0].token_ids   # a stream: each output carries its new token
                return tokens

            results = await asyncio.gather(*(one(i) for i in range(6)))
            s = engine.stats()
            return calls, s.steps_graph + s.steps_rows + s.steps_eager + s.steps_swapin, results
        finally:
            loop.call_soon_threadsafe = real
            await engine.shutdown()

    calls, steps, results = asyncio.run(main())
    assert all(len(r) == 6 for r in results)
    assert calls <= steps  # 6 requests x 6 tokens: per-output delivery would need 36


def test_first_and_final_outputs_only(config):
    """stream=False: the first output that carries a token, then the final one with the whole
    completion; a stream's outputs carry one new token each and add up to the same."""
    import asyncio

    from pensieve.engine.async_engine import AsyncEngine

    params = SamplingParams(temperature=0.0, max_tokens=7, ignore_eos=True)

    async def main():
        engine = AsyncEngine(config)
        try:
            every = [o async for o in engine.generate("a", [5, 6, 7, 8, 9], params)]
            sparse = [o async for o in engine.generate("b", [5, 6, 7, 8, 9], params, stream=False)]
            return every, sparse
        finally:
            await engine.shutdown()

    every, sparse = asyncio.run(main())
    assert len(every) == 7 and len(sparse) == 2
    assert all(len(o.outputs[0].token_ids) == 1 for o in every)
    assert len(sparse[0].outputs[0].token_ids) == 1 and not sparse[0].finished
    streamed_ids = [t for o in every for t in o.outputs[0].token_ids]
    assert sparse[1].finished and sparse[1].outputs[0].token_ids == streamed_ids
    assert sparse[1].outputs[0].text == "".join(o.outputs[0].text for o in every)


def test_engine_builds_outputs_only_when_asked(config):
    """LLMEngine.add_request(stream=False): step() returns that request at its first token and at
    its end only (whole); a streamed request beside it gets one output per token, each one new token."""
    from pensieve.engine.llm_engine import LLMEngine

    engine = LLMEngine(config)
    params = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)
    engine.add_request("quiet", [5, 6, 7, 8], params)
    engine.add_request("loud", [5, 6, 7, 8], params, stream=True)
    seen: dict[str, list[int]] = {"quiet": [], "loud": []}
    while engine.has_unfinished():
        for out in engine.step():
            seen[out.request_id].append(len(out.outputs[0].token_ids))
    assert seen == {"quiet": [1, 5], "loud": [1, 1, 1, 1, 1]}


@pytest.mark.parametrize("kind", ["thread", "process"])
def test_a_duplicate_request_id_is_refused_and_the_first_finishes(config, kind):
    import asyncio

    from pensieve.engine.async_engine import AsyncEngine
    from pensieve.engine.engine_process import EngineProcess

    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)

    async def main() -> None:
        engine = AsyncEngine(config) if kind == "thread" else EngineProcess(config)
        try:
            first = engine.generate("same", [5, 6, 7, 8], params)
            got = [await first.__anext__()]
            with pytest.raises(ValueError, match="already running"):
                async for _ in engine.generate("same", [9, 10], params):
                    pass
            async def rest() -> list:
                return [o async for o in first]

            got += await asyncio.wait_for(rest(), 60)  # a lost stream would wait forever
            assert got[-1].finished and sum(len(o.outputs[0].token_ids) for o in got) == 12
        finally:
            await engine.shutdown()

    asyncio.run(main())
