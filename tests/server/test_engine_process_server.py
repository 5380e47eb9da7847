"""The server over an engine in its own process (`pensieve serve --engine-process`), driven by the
real openai client: multi-turn cache hits, streaming, errors and a disconnect that frees blocks."""
from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from tests.loopback import free_port, serve_in_thread
from tests.server.conftest import ServerHandle


@pytest.fixture(scope="module")
def process_server() -> Iterator[ServerHandle]:
    from pensieve.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
    from pensieve.model.tiny_llama import tiny_llama_path
    from pensieve.engine.engine_process import EngineProcess
    from pensieve.server.app import build_app
    from pensieve.server.settings import ServerSettings

    config = EngineConfig(
        model=ModelConfig(model=str(tiny_llama_path()), dtype="float32", max_model_len=512),
        cache=CacheConfig(num_gpu_blocks=256, num_cpu_blocks=256),
        scheduler=SchedulerConfig(max_num_seqs=16, max_num_batched_tokens=1024), device="cpu")
    engine = EngineProcess(config)
    port = free_port()
    app = build_app(engine, ServerSettings(port=port, served_model_names=("demo",)))
    with serve_in_thread(app, port) as url:
        yield ServerHandle(url, engine, app, "demo")
    assert not engine._proc.is_alive()  # the app's shutdown stopped the engine process


def test_chat_turns_hit_the_cache_across_the_process(process_server: ServerHandle) -> None:
    client = process_server.client(key="unused")
    history = [{"role": "user", "content": "Tell me something about caches, at some length please."}]
    first = client.chat.completions.create(model="demo", messages=history, max_tokens=8, temperature=0,
                                           extra_body={"ignore_eos": True})
    history += [{"role": "assistant", "content": first.choices[0].message.content},
                {"role": "user", "content": "And then?"}]
    second = client.chat.completions.create(model="demo", messages=history, max_tokens=8, temperature=0,
                                            extra_body={"ignore_eos": True})
    assert first.usage.completion_tokens == second.usage.completion_tokens == 8
    assert second.usage.prompt_tokens_details.cached_tokens > 0
    chunks = list(client.chat.completions.create(model="demo", messages=history, max_tokens=6, temperature=0,
                                                 stream=True, extra_body={"ignore_eos": True}))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    again = client.chat.completions.create(model="demo", messages=history, max_tokens=6, temperature=0,
                                           extra_body={"ignore_eos": True})
    assert streamed == again.choices[0].message.content


def test_errors_and_disconnects_across_the_process(process_server: ServerHandle) -> None:
    with process_server.http(key=None) as http:
        too_long = {"model": "demo", "prompt": "word " * 2000, "max_tokens": 4}
        r = http.post("/v1/completions", json=too_long)
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
        body = {"model": "demo", "prompt": "A long story:", "max_tokens": 400, "ignore_eos": True, "stream": True}
        with http.stream("POST", "/v1/completions", json=body) as resp:
            for _ in resp.iter_lines():
                break  # hang up after the first event
    stats = process_server.wait_idle()
    assert stats.gpu_blocks_used == 0
    metrics = httpx.get(f"{process_server.base_url}/metrics").text
    assert "pensieve_engine_steps_total" in metrics
    assert 'pensieve_engine_steps_not_overlapped_total{reason="after_read_back"}' in metrics


def test_a_dead_engine_process_fails_requests_and_health() -> None:
    """The engine process dies (OOM killer, driver fault): requests in flight and new ones fail with an
    error instead of hanging, and /health says 503 so a supervisor restarts the server."""
    from pensieve.config import CacheConfig, EngineConfig, ModelConfig
    from pensieve.model.tiny_llama import tiny_llama_path
    from pensieve.engine.engine_process import EngineProcess
    from pensieve.server.app import build_app
    from pensieve.server.settings import ServerSettings

    engine = EngineProcess(EngineConfig(model=ModelConfig(model=str(tiny_llama_path()), max_model_len=256),
                                        cache=CacheConfig(num_gpu_blocks=64, num_cpu_blocks=64), device="cpu"))
    port = free_port()
    app = build_app(engine, ServerSettings(port=port, served_model_names=("demo",)))
    with serve_in_thread(app, port) as url, httpx.Client(base_url=url, timeout=30) as http:
        assert http.get("/health").status_code == 200
        body = {"model": "demo", "prompt": "A long story:", "max_tokens": 200, "ignore_eos": True, "stream": True}
        with http.stream("POST", "/v1/completions", json=body) as resp:
            lines = resp.iter_lines()
            assert next(lines).startswith("data:")
            engine._proc.kill()
            rest = "\n".join(lines)           # the stream ends, with an error event, instead of hanging
        assert "error" in rest
        assert http.get("/health").status_code == 503
        r = http.post("/v1/completions", json={"model": "demo", "prompt": "Hi", "max_tokens": 2})
        assert r.status_code >= 500 and "error" in r.json()
