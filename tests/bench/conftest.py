"""Shared fixtures of the benchmark tests: the demo model, and a real demo server on loopback."""
from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest


@pytest.fixture(scope="session")
def demo_path() -> str:
    from pensieve.demo import demo_model_path

    return str(demo_model_path())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def demo_server(demo_path: str) -> Iterator[str]:
    """`build_app` over an AsyncEngine with the demo model, served by uvicorn in a thread; yields its URL."""
    import uvicorn

    from pensieve.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
    from pensieve.engine.async_engine import AsyncEngine
    from pensieve.server.app import build_app
    from pensieve.server.settings import ServerSettings

    engine = AsyncEngine(EngineConfig(
        model=ModelConfig(model=demo_path, dtype="float32", max_model_len=512),
        cache=CacheConfig(num_gpu_blocks=128, num_cpu_blocks=128, cache_mode="tiered"),
        scheduler=SchedulerConfig(max_num_seqs=16, max_num_batched_tokens=1024), device="cpu"))
    port = _free_port()
    app = build_app(engine, ServerSettings(port=port))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, name="bench-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the demo server did not start")
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=30)
