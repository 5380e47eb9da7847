"""Shared fixtures of the benchmark tests: the tiny random Llama, and a real server of it on loopback."""
from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.loopback import free_port, serve_in_thread


@pytest.fixture(scope="session")
def tiny_path() -> str:
    from pensieve.model.tiny_llama import tiny_llama_path

    return str(tiny_llama_path())


@pytest.fixture(scope="module")
def tiny_server(tiny_path: str) -> Iterator[str]:
    """`build_app` over an AsyncEngine with the tiny random Llama, served by uvicorn in a thread; yields its URL."""
    from pensieve.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
    from pensieve.engine.async_engine import AsyncEngine
    from pensieve.server.app import build_app
    from pensieve.server.settings import ServerSettings

    engine = AsyncEngine(EngineConfig(
        model=ModelConfig(model=tiny_path, dtype="float32", max_model_len=512),
        cache=CacheConfig(num_gpu_blocks=128, num_cpu_blocks=128, cache_mode="tiered"),
        scheduler=SchedulerConfig(max_num_seqs=16, max_num_batched_tokens=1024), device="cpu"))
    port = free_port()
    app = build_app(engine, ServerSettings(port=port))
    with serve_in_thread(app, port) as url:
        yield url
