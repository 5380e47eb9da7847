"""The offline API, shaped like vLLM's: LLM(...).generate / .chat, and AsyncEngine streaming."""
from __future__ import annotations

import asyncio
import time

import pytest

from pensieve import LLM, SamplingParams
from pensieve.config import CacheConfig, EngineConfig, ModelConfig
from pensieve.engine.async_engine import AsyncEngine
from pensieve.model.random_checkpoint import make_random_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_random_checkpoint(tmp_path_factory.mktemp("qwen3"), "qwen3", seed=3, initializer_range=0.1)


@pytest.fixture(scope="module")
def llm(checkpoint):
    return LLM(str(checkpoint), device="cpu", num_gpu_blocks=128, num_cpu_blocks=64, max_model_len=256)


def test_generate_strings_and_token_ids(llm):
    greedy = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    text_ids = llm.tokenizer("caching keeps the history")["input_ids"]
    outs = llm.generate(["caching keeps the history", {"prompt_token_ids": text_ids}], greedy)
    assert len(outs) == 2
    assert outs[0].prompt_token_ids == text_ids
    assert outs[0].outputs[0].token_ids == outs[1].outputs[0].token_ids  # same prompt, same greedy reply
    assert len(outs[0].outputs[0].token_ids) == 5 and outs[0].outputs[0].finish_reason == "length"
    assert outs[0].outputs[0].text == llm.tokenizer.decode(outs[0].outputs[0].token_ids, skip_special_tokens=True)


@pytest.mark.parametrize("bad", [-1, 10**6], ids=["negative", "past-vocab"])
def test_token_ids_outside_the_vocabulary_are_refused(llm, bad):
    with pytest.raises(ValueError, match="prompt token ids must be in"):
        llm.generate([{"prompt_token_ids": [5, bad, 6]}], SamplingParams(max_tokens=2))
    assert llm.generate([{"prompt_token_ids": [5, 6]}], SamplingParams(max_tokens=2))  # the engine goes on


def test_chat_applies_the_template(llm):
    messages = [{"role": "user", "content": "hello"}]
    out = llm.chat(messages, SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))[0]
    expected = llm.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert llm.tokenizer.decode(out.prompt_token_ids) == expected


def test_stop_strings_and_logprobs(llm):
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=2)
    full = llm.generate(["a b c d"], params)[0].outputs[0]
    assert len(full.logprobs) == 8 and all(len(top) == 2 for _, top in full.logprobs)
    stop = full.text[2:4]
    if stop.strip():
        cut = llm.generate(["a b c d"], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, stop=[stop]))[0]
        assert cut.outputs[0].finish_reason == "stop" and stop not in cut.outputs[0].text


def test_conversation_ttl_expires_idle_conversations(checkpoint):
    llm = LLM(str(checkpoint), device="cpu", num_gpu_blocks=64, num_cpu_blocks=32, max_model_len=256,
              conversation_ttl=0.2)
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    llm.generate([{"prompt_token_ids": list(range(10, 40))}], params, conversation_ids=["idle"])
    assert "idle" in llm.engine.kv.conversations
    time.sleep(0.3)
    llm.generate([{"prompt_token_ids": list(range(50, 60))}], params)  # any step expires idle ones
    assert "idle" not in llm.engine.kv.conversations
    llm.engine.check_integrity()


def test_async_engine_streams_and_aborts_on_close(checkpoint):
    engine = AsyncEngine(EngineConfig(model=ModelConfig(str(checkpoint), max_model_len=256),
                                      cache=CacheConfig(num_gpu_blocks=64, num_cpu_blocks=16), device="cpu",
                                      enforce_eager=True))

    async def main() -> None:
        seen = []
        async for out in engine.generate("a", list(range(10, 20)), SamplingParams(temperature=0, max_tokens=4,
                                                                                    ignore_eos=True)):
            seen.append(len(out.outputs[0].token_ids))
        assert seen == [1, 1, 1, 1]   # a stream: each output carries only its new token
        stream = engine.generate("b", list(range(10, 20)), SamplingParams(max_tokens=200, ignore_eos=True))
        await stream.__anext__()
        await stream.aclose()  # the client went away: the request is aborted and its blocks freed
        for _ in range(200):
            st = engine.stats()
            if st.num_running == 0 and st.gpu_blocks_used == 0:
                break
            await asyncio.sleep(0.01)
        assert engine.stats().num_running == 0 and engine.stats().gpu_blocks_used == 0
        with pytest.raises(ValueError, match="context"):
            async for _ in engine.generate("c", list(range(300)), SamplingParams()):
                pass
        engine.check_integrity()
        await engine.shutdown()

    asyncio.run(main())


def test_a_failed_step_fails_its_requests_and_the_engine_goes_on(checkpoint, monkeypatch):
    engine = AsyncEngine(EngineConfig(model=ModelConfig(str(checkpoint), max_model_len=256),
                                      cache=CacheConfig(num_gpu_blocks=64, num_cpu_blocks=16), device="cpu",
                                      enforce_eager=True))
    runner = engine.engine.runner
    real = runner.launch
    calls = {"n": 0}

    def flaky(step, sample=None, input_ids=None):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("injected device fault")
        return real(step, sample, input_ids)

    monkeypatch.setattr(runner, "launch", flaky)
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)

    async def main() -> None:
        with pytest.raises(RuntimeError, match="injected"):
            async for _ in engine.generate("doomed", list(range(10, 30)), params):
                pass
        outs = [out async for out in engine.generate("fine", list(range(10, 30)), params)]
        assert outs[-1].finished and sum(len(o.outputs[0].token_ids) for o in outs) == 5
        engine.check_integrity()
        assert engine.stats().gpu_blocks_used == 0
        await engine.shutdown()

    asyncio.run(main())
