"""The engine core in its own process: same answers and the same caller-side surface as AsyncEngine."""
from __future__ import annotations

import asyncio

import pytest

from pensieve.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from pensieve.engine.async_engine import AsyncEngine
from pensieve.engine.engine_process import EngineProcess
from pensieve.model.random_checkpoint import make_random_checkpoint
from pensieve.sampling_params import SamplingParams
from tests.engine.test_conversation_cache import DEVICE


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> EngineConfig:
    path = make_random_checkpoint(tmp_path_factory.mktemp("llama"), "llama", seed=1, initializer_range=0.1)
    return EngineConfig(model=ModelConfig(model=str(path), max_model_len=128),
                        cache=CacheConfig(block_size=4, num_gpu_blocks=64, num_cpu_blocks=64),
                        scheduler=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64),
                        device=DEVICE, enforce_eager=DEVICE == "cpu")


async def _collect(engine, rid: str, prompt: list[int], params: SamplingParams, **kw) -> list:
    return [out async for out in engine.generate(rid, prompt, params, **kw)]


def test_same_answers_and_surface_as_the_thread_engine(config):
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    prompts = {f"r{i}": [5 + i, 6, 7, 8, 9, 10 + i] for i in range(4)}

    async def run(engine) -> dict:
        try:
            outs = await asyncio.gather(*(_collect(engine, rid, p, params) for rid, p in prompts.items()))
            return {rid: [t for out in o for t in out.outputs[0].token_ids] for rid, o in zip(prompts, outs)}
        finally:
            await engine.shutdown()

    from pensieve.engine.client import EngineClient

    thread_engine = AsyncEngine(config)
    assert isinstance(thread_engine, EngineClient)   # the one surface the server uses
    want = asyncio.run(run(thread_engine))
    process = EngineProcess(config)
    assert isinstance(process, EngineClient)
    assert process.max_model_len == 128 and process.device == DEVICE and process.tokenizer is not None

    async def checks() -> dict:
        got = await asyncio.gather(*(_collect(process, rid, p, params) for rid, p in prompts.items()))
        answers = {rid: [t for out in o for t in out.outputs[0].token_ids] for rid, o in zip(prompts, got)}
        assert all(len(o) == 8 for o in got)  # one output per token, each carrying only that token
        assert all(len(out.outputs[0].token_ids) == 1 for o in got for out in o)

        # stream=False: first token and the end, with the whole completion
        sparse = await _collect(process, "sparse", prompts["r0"], params, stream=False)
        assert [len(o.outputs[0].token_ids) for o in sparse] == [1, 8]
        assert sparse[-1].outputs[0].token_ids == answers["r0"]

        # a bad prompt fails its own stream with the engine's error, nothing else
        with pytest.raises(ValueError, match="context"):
            await _collect(process, "bad", list(range(5, 140)), params)

        # a caller that stops early aborts its request: the blocks come back
        long = SamplingParams(temperature=0.0, max_tokens=60, ignore_eos=True)
        async for out in process.generate("early", [5, 6, 7], long):
            break
        for _ in range(100):
            s = process.stats()
            if s.num_running == 0 and s.gpu_blocks_used == 0:
                break
            await asyncio.sleep(0.05)
        assert process.stats().gpu_blocks_used == 0

        # conversations and the integrity check go through calls; profiles too
        conv = await _collect(process, "c0", [5, 6, 7, 8, 9], params, conversation_id="chat")
        assert conv[-1].finished
        assert await asyncio.to_thread(process.delete_conversation, "chat")
        assert not await asyncio.to_thread(process.delete_conversation, "chat")
        await asyncio.to_thread(process.check_integrity)
        await _collect(process, "c1", [5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21], params)
        assert process.stats().gpu_blocks_cached > 0
        assert await asyncio.to_thread(process.reset_cache)
        assert process.stats().gpu_blocks_cached == 0   # the stats arrive before the call's reply
        window = asyncio.ensure_future(process.profile(2))
        await _collect(process, "p0", [5, 6, 7], params)
        assert (await asyncio.wait_for(window, 60)).startswith("2 steps in ")
        return answers

    try:
        got = asyncio.run(checks())
    finally:
        asyncio.run(process.shutdown())
    assert got == want
    assert not process._proc.is_alive()

    async def after() -> None:
        with pytest.raises(RuntimeError, match="shut down"):
            await _collect(process, "late", [5, 6], params)

    asyncio.run(after())


def test_an_engine_that_cannot_start_fails_the_constructor(config):
    """The child's start-up error comes back as the parent's exception, with the child's message."""
    bad = EngineConfig(model=ModelConfig(model=config.model.model, dtype="float7"), device="cpu")
    with pytest.raises(RuntimeError, match="failed to start.*float7"):
        EngineProcess(bad)


def test_exceptions_cross_the_pipe_even_when_they_cannot_be_pickled():
    from pensieve.engine.engine_process import _portable

    class Odd(Exception):
        def __init__(self, a, b):  # pickling calls Odd(msg) and fails
            super().__init__(f"{a}/{b}")

    assert isinstance(_portable(ValueError("bad prompt")), ValueError)
    odd = _portable(Odd(1, 2))
    assert isinstance(odd, RuntimeError) and "Odd: 1/2" in str(odd)
