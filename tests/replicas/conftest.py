"""Replicas for the routing tests: real servers on loopback sharing one copy of the demo weights, and a real
vllm-router process in front (tests of a killed replica start whole `pensieve serve` processes instead)."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.loopback import free_port, serve_in_thread

BLOCK = 16


@dataclass(frozen=True)
class Replica:
    name: str
    url: str
    engine: Any
    kv_events: str | None


@pytest.fixture(scope="session")
def demo_weights() -> tuple:
    """(model, hf_config, dtype) of the demo model on the CPU, loaded once for every replica."""
    from pensieve.model.tiny_llama import tiny_llama_path
    from pensieve.model.loader import load_model

    import torch

    return load_model(str(tiny_llama_path()), "float32", torch.device("cpu"))


@contextmanager
def replicas(weights: tuple, n: int, *, kv_events: bool = False, blocks: int = 1024,
             extra_peers: tuple[tuple[str, str], ...] = ()) -> Iterator[list[Replica]]:
    """n fresh replicas (empty caches) named replica-0.., each knowing the others (and `extra_peers`) as peers."""
    from pensieve.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
    from pensieve.model.tiny_llama import tiny_llama_path
    from pensieve.engine.async_engine import AsyncEngine
    from pensieve.server.app import build_app
    from pensieve.server.settings import ServerSettings

    ports = [free_port() for _ in range(n)]
    names = [f"replica-{i}" for i in range(n)]
    urls = [f"http://127.0.0.1:{p}" for p in ports]
    with ExitStack() as stack:
        out = []
        for i, (name, port, url) in enumerate(zip(names, ports, urls)):
            engine = AsyncEngine(EngineConfig(
                model=ModelConfig(model=str(tiny_llama_path()), dtype="float32", max_model_len=1024),
                cache=CacheConfig(num_gpu_blocks=blocks, num_cpu_blocks=blocks, cache_mode="tiered", block_size=BLOCK),
                scheduler=SchedulerConfig(max_num_seqs=16, max_num_batched_tokens=2048), device="cpu"),
                preloaded=weights)
            events = f"tcp://127.0.0.1:{free_port()}" if kv_events else None
            peers = tuple((m, u) for m, u in zip(names, urls) if m != name) + extra_peers
            app = build_app(engine, ServerSettings(port=port, served_model_names=("demo",), replica_name=name,
                                                   replica_peers=peers, kv_events_endpoint=events))
            stack.enter_context(serve_in_thread(app, port))
            out.append(Replica(name, url, engine, events))
        yield out


@contextmanager
def router(reps: list[Replica], policy: str, log_dir: Path, **kw: Any) -> Iterator[str]:
    """A vllm-router process (`policy`) in front of `reps`; yields its base URL."""
    from pensieve.replicas.launcher import RouterConfig, RouterProcess, Worker

    cfg = RouterConfig(policy=policy, port=free_port(), metrics_port=free_port(), block_size=BLOCK, **kw)
    with RouterProcess([Worker(r.url, r.kv_events) for r in reps], cfg, log_dir / f"router-{policy}.log") as proc:
        yield proc.url
