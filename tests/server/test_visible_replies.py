"""A model with more ids than its tokenizer's trained BPE (every real-shape random checkpoint) still streams
text for every token: clients that read the streamed text, as vLLM's multi-turn benchmark does, see replies."""
from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.loopback import free_port, serve_in_thread
from tests.server.conftest import ServerHandle

MAX_TOKENS = 24


@pytest.fixture(scope="module")
def wide_vocab_server(tmp_path_factory) -> Iterator[ServerHandle]:
    from pensieve.config import CacheConfig, EngineConfig, ModelConfig
    from pensieve.engine.async_engine import AsyncEngine
    from pensieve.model.random_checkpoint import make_random_checkpoint
    from pensieve.server.app import build_app
    from pensieve.server.settings import ServerSettings

    path = make_random_checkpoint(tmp_path_factory.mktemp("wide"), "llama", vocab_size=4096, seed=5)
    engine = AsyncEngine(EngineConfig(
        model=ModelConfig(model=str(path), dtype="float32", max_model_len=256),
        cache=CacheConfig(num_gpu_blocks=64, num_cpu_blocks=0, cache_mode="gpu"), device="cpu"))
    port = free_port()
    app = build_app(engine, ServerSettings(port=port, served_model_names=("wide",)))
    with serve_in_thread(app, port) as url:
        yield ServerHandle(url, engine, app, "wide")


def test_every_sampled_id_streams_as_text(wide_vocab_server: ServerHandle) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=wide_vocab_server.api_url, api_key="none", max_retries=0, timeout=60)
    stream = client.chat.completions.create(
        model="wide", messages=[{"role": "user", "content": "Tell me about caching."}], max_tokens=MAX_TOKENS,
        temperature=1.0, seed=0, stream=True, stream_options={"include_usage": True},
        extra_body={"ignore_eos": True})
    deltas, usage = [], None
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            deltas.append(chunk.choices[0].delta.content)
        usage = chunk.usage or usage
    assert usage is not None and usage.completion_tokens == MAX_TOKENS
    # sampled ids are mostly past the BPE's 1,024: each is a visible filler token, its own delta
    assert len(deltas) >= MAX_TOKENS // 2, deltas


def test_a_resent_reply_is_history_the_cache_holds(wide_vocab_server: ServerHandle) -> None:
    """vLLM's client sends each reply's text back as history: it must tokenize to about the sampled ids,
    not to every filler token spelt out in BPE pieces, and the next turn must hit the cache."""
    from openai import OpenAI

    client = OpenAI(base_url=wide_vocab_server.api_url, api_key="none", max_retries=0, timeout=60)
    messages = [{"role": "user", "content": "Tell me about caching, please, at some length."}]
    first = client.chat.completions.create(model="wide", messages=messages, max_tokens=MAX_TOKENS,
                                           temperature=1.0, seed=1, extra_body={"ignore_eos": True})
    messages += [{"role": "assistant", "content": first.choices[0].message.content},
                 {"role": "user", "content": "And then?"}]
    second = client.chat.completions.create(model="wide", messages=messages, max_tokens=4, temperature=0.0)
    grown = second.usage.prompt_tokens - first.usage.prompt_tokens
    # the reply's 24 ids, a few BPE-sampled ones re-merged, the new turn and the template: well under 2x;
    # spelt out, each filler would be 5-8 tokens
    assert grown <= 2 * MAX_TOKENS + 16, (first.usage, second.usage)
    assert second.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens - 16, second.usage
