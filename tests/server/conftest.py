"""One real server for the whole session: the tiny random Llama on CPU (served under the name "demo"),
small pools, two API keys.

Uvicorn runs in a background thread (its own event loop); tests drive it over loopback with the
openai client or httpx, and read `engine.stats()` directly to check that blocks come back.
"""
from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from tests.loopback import free_port, serve_in_thread

KEY_A, KEY_B = "key-alpha", "key-beta"
MAX_MODEL_LEN = 512


@dataclass
class ServerHandle:
    base_url: str        # http://127.0.0.1:PORT
    engine: Any
    app: Any
    model: str

    @property
    def api_url(self) -> str:
        return f"{self.base_url}/v1"

    def client(self, key: str = KEY_A, **kwargs: Any):
        from openai import OpenAI

        return OpenAI(base_url=self.api_url, api_key=key, max_retries=0, timeout=60, **kwargs)

    def http(self, key: str | None = KEY_A) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.base_url, headers=headers, timeout=60)

    def wait_idle(self, timeout: float = 30.0) -> Any:
        """Polls until the engine has no running or waiting request; returns the stats."""
        deadline = time.monotonic() + timeout
        while True:
            stats = self.engine.stats()
            if stats.num_running == 0 and stats.num_waiting == 0:
                return stats
            if time.monotonic() > deadline:
                raise AssertionError(f"engine not idle after {timeout} s: {stats}")
            time.sleep(0.05)


def assert_openai_error(resp: httpx.Response, status: int, *, param: str | None = None, code: str | None = None,
                        says: str | None = None) -> dict[str, Any]:
    """An OpenAI-shaped error body with `status`, and the param, code and words asked for."""
    assert resp.status_code == status, (resp.status_code, resp.text[:300])
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err
    if says is not None:
        assert says in err["message"], err
    return err


@pytest.fixture()
def http(server: ServerHandle) -> Iterator[httpx.Client]:
    """A client of the shared server; after the test, the server must still answer /health and a chat."""
    with server.http(KEY_A) as client:
        yield client
    with server.http(KEY_A) as client:
        assert client.get("/health").status_code == 200
        ok = client.post("/v1/chat/completions", json={"model": "demo", "messages": [{"role": "user", "content": "hi"}],
                                                       "max_tokens": 1})
        assert ok.status_code == 200, ok.text


@pytest.fixture(scope="session")
def server() -> Iterator[ServerHandle]:
    from pensieve.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
    from pensieve.model.tiny_llama import tiny_llama_path
    from pensieve.engine.async_engine import AsyncEngine
    from pensieve.server.app import build_app
    from pensieve.server.settings import ServerSettings

    model = str(tiny_llama_path())
    config = EngineConfig(
        model=ModelConfig(model=model, dtype="float32", max_model_len=MAX_MODEL_LEN),
        cache=CacheConfig(num_gpu_blocks=256, num_cpu_blocks=256, cache_mode="tiered"),
        scheduler=SchedulerConfig(max_num_seqs=16, max_num_batched_tokens=1024),
        # as on a GPU, where it is the default: decode steps overlap, outputs come a step later
        device="cpu", async_scheduling=True)
    engine = AsyncEngine(config)
    port = free_port()
    app = build_app(engine, ServerSettings(port=port, api_keys=(KEY_A, KEY_B), served_model_names=("demo",)))
    with serve_in_thread(app, port) as url:
        yield ServerHandle(url, engine, app, "demo")
