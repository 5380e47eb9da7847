"""The waiting-queue bound: past max_num_seqs running + max_waiting waiting (by default as many as
run), a burst is shed with 503 + Retry-After instead of queueing without bound; what is admitted
finishes, and the server takes requests again once the burst is over."""
from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from tests.loopback import free_port, serve_in_thread
from tests.server.conftest import ServerHandle

MAX_NUM_SEQS = 2


@pytest.fixture(scope="module")
def small_server() -> Iterator[ServerHandle]:
    from pensieve.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
    from pensieve.model.tiny_llama import tiny_llama_path
    from pensieve.engine.async_engine import AsyncEngine
    from pensieve.server.app import build_app
    from pensieve.server.settings import ServerSettings

    engine = AsyncEngine(EngineConfig(
        model=ModelConfig(model=str(tiny_llama_path()), dtype="float32", max_model_len=512),
        cache=CacheConfig(num_gpu_blocks=128, num_cpu_blocks=0, cache_mode="gpu"),
        scheduler=SchedulerConfig(max_num_seqs=MAX_NUM_SEQS, max_num_batched_tokens=512), device="cpu"))
    port = free_port()
    app = build_app(engine, ServerSettings(port=port, served_model_names=("demo",), retry_after_s=2))
    with serve_in_thread(app, port) as url:
        yield ServerHandle(url, engine, app, "demo")


def test_a_burst_beyond_the_bound_is_shed_with_retry_after(small_server: ServerHandle) -> None:
    from openai import APIStatusError, AsyncOpenAI

    async def one(client: AsyncOpenAI, i: int, stream: bool) -> tuple[str, object]:
        kwargs = dict(model="demo", messages=[{"role": "user", "content": f"story {i}"}], max_tokens=150,
                      temperature=0, extra_body={"ignore_eos": True})
        try:
            if stream:
                chunks = [c async for c in await client.chat.completions.create(stream=True, **kwargs)]
                return "ok", chunks[-1].choices[0].finish_reason
            resp = await client.chat.completions.create(**kwargs)
            return "ok", resp.choices[0].finish_reason
        except APIStatusError as exc:
            return "refused", exc

    async def burst() -> list[tuple[str, object]]:
        client = AsyncOpenAI(base_url=small_server.api_url, api_key="none", max_retries=0, timeout=120)
        try:
            return await asyncio.gather(*(one(client, i, stream=i % 2 == 0) for i in range(10)))
        finally:
            await client.close()

    results = asyncio.run(burst())
    admitted = [r for kind, r in results if kind == "ok"]
    refused = [r for kind, r in results if kind == "refused"]
    # 2 run and 2 wait (max_waiting defaults to max_num_seqs); the other 6 are shed at once
    assert len(admitted) == 2 * MAX_NUM_SEQS and all(reason == "length" for reason in admitted)
    assert len(refused) == 10 - 2 * MAX_NUM_SEQS
    for exc in refused:
        assert exc.status_code == 503 and exc.response.headers["retry-after"] == "2"
        assert exc.body["code"] == "overloaded" and "limit 2" in exc.body["message"]

    stats = small_server.wait_idle()
    assert stats.gpu_blocks_used == 0
    client = small_server.client(key="none")
    assert client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "again"}],
                                          max_tokens=2).choices[0].finish_reason == "length"
