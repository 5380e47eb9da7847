"""POST /reset_prefix_cache (--enable-cache-reset): empties both cache tiers between benchmark runs, refuses
while requests are in flight, and does not exist unless enabled."""
from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from tests.loopback import free_port, serve_in_thread
from tests.server.conftest import KEY_A, ServerHandle, assert_openai_error

HISTORY = [{"role": "user", "content": "Tell me about caching the keys and values of a long conversation."}]


@pytest.fixture(scope="module")
def resettable() -> Iterator[ServerHandle]:
    from pensieve.config import CacheConfig, EngineConfig, ModelConfig
    from pensieve.engine.async_engine import AsyncEngine
    from pensieve.model.tiny_llama import tiny_llama_path
    from pensieve.server.app import build_app
    from pensieve.server.settings import ServerSettings

    engine = AsyncEngine(EngineConfig(
        model=ModelConfig(model=str(tiny_llama_path()), dtype="float32", max_model_len=512),
        cache=CacheConfig(num_gpu_blocks=16, num_cpu_blocks=64, cache_mode="tiered"), device="cpu"))
    port = free_port()
    app = build_app(engine, ServerSettings(port=port, api_keys=(KEY_A,), served_model_names=("demo",),
                                           enable_cache_reset=True))
    with serve_in_thread(app, port) as url:
        yield ServerHandle(url, engine, app, "demo")


def cached_tokens(server: ServerHandle, messages: list[dict]) -> int:
    resp = server.client().chat.completions.create(model="demo", messages=messages, max_tokens=4, temperature=0)
    return resp.usage.prompt_tokens_details.cached_tokens


def test_reset_empties_both_tiers_and_the_next_turn_starts_cold(resettable: ServerHandle) -> None:
    for i in range(6):   # more than the 16 GPU blocks hold: some of it moves to the CPU tier
        cached_tokens(resettable, [{"role": "user", "content": f"conversation {i}: " + "a fact to keep. " * 8}])
    cached_tokens(resettable, HISTORY)
    assert cached_tokens(resettable, HISTORY) > 0
    stats = resettable.wait_idle()
    assert stats.gpu_blocks_cached + stats.cpu_blocks_used > 0
    with resettable.http() as http:
        resp = http.post("/reset_prefix_cache")
    assert resp.status_code == 200 and resp.json() == {"reset": True}
    stats = resettable.engine.stats()
    assert stats.gpu_blocks_cached == stats.cpu_blocks_used == stats.gpu_blocks_used == 0
    resettable.engine.check_integrity()
    assert cached_tokens(resettable, HISTORY) == 0
    assert cached_tokens(resettable, HISTORY) > 0          # and it caches again


def test_reset_refuses_while_a_request_is_in_flight(resettable: ServerHandle) -> None:
    body = {"model": "demo", "messages": HISTORY, "max_tokens": 200, "stream": True, "ignore_eos": True}
    with resettable.http() as http:
        with http.stream("POST", "/v1/chat/completions", json=body) as stream:
            lines = stream.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            assert json.loads(first[len("data: "):])["object"] == "chat.completion.chunk"
            with resettable.http() as other:
                assert_openai_error(other.post("/reset_prefix_cache"), 409, code="server_busy")
        resettable.wait_idle()
        assert http.post("/reset_prefix_cache").status_code == 200


def test_reset_needs_an_api_key(resettable: ServerHandle) -> None:
    with resettable.http(key=None) as http:
        assert_openai_error(http.post("/reset_prefix_cache"), 401)


def test_reset_is_absent_unless_enabled(server: ServerHandle) -> None:
    with server.http() as http:
        assert http.post("/reset_prefix_cache").status_code == 404
