"""Hot conversations survive a restart: save the cache, start a new engine, load it, hit it."""
from __future__ import annotations

import json

import pytest

from pensieve.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from pensieve.engine.llm_engine import LLMEngine
from pensieve.model.random_checkpoint import make_random_checkpoint
from pensieve.sampling_params import SamplingParams

BS = 4


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    a = make_random_checkpoint(tmp_path_factory.mktemp("a"), "llama", seed=5, initializer_range=0.1)
    b = make_random_checkpoint(tmp_path_factory.mktemp("b"), "llama", seed=6, initializer_range=0.1)
    return a, b


def engine(path, mode="tiered", gpu=64, cpu=64) -> LLMEngine:
    return LLMEngine(EngineConfig(
        model=ModelConfig(model=str(path), max_model_len=256),
        cache=CacheConfig(block_size=BS, cache_mode=mode, num_gpu_blocks=gpu, num_cpu_blocks=cpu),
        scheduler=SchedulerConfig(max_num_batched_tokens=64), device="cpu", enforce_eager=True))


def run(e: LLMEngine, rid: str, prompt: list[int], conv: str | None = None):
    e.add_request(rid, prompt, SamplingParams(temperature=0, max_tokens=5, ignore_eos=True), conv)
    done = {}
    while e.has_unfinished():
        for out in e.step():
            if out.finished:
                done[out.request_id] = out
    return done[rid]


@pytest.mark.parametrize("mode", ["tiered", "gpu"])
def test_restart_keeps_conversations_and_answers(checkpoints, tmp_path, mode):
    ckpt, _ = checkpoints
    first = engine(ckpt, mode, cpu=64 if mode == "tiered" else 0)
    t0 = run(first, "t0", list(range(20, 45)), conv="chat")
    history = t0.prompt_token_ids + t0.outputs[0].token_ids + [7, 8, 9]
    saved = first.save_cache(str(tmp_path / "kv"))
    assert saved == len(first.kv.cached_blocks()) > 0

    second = engine(ckpt, mode, cpu=64 if mode == "tiered" else 0)
    assert second.load_cache(str(tmp_path / "kv")) == saved
    assert "chat" in second.kv.conversations
    assert second.kv.conversations["chat"].tokens == t0.prompt_token_ids + t0.outputs[0].token_ids  # appendable
    second.check_integrity()
    resumed = run(second, "t1", history, conv="chat")
    hits = resumed.cache.cpu_hit_tokens if mode == "tiered" else resumed.cache.gpu_hit_tokens
    assert hits == ((len(t0.prompt_token_ids) + 5 - 1) // BS) * BS     # every computed block came back

    cold = engine(ckpt, "stateless")
    assert run(cold, "t1", history).outputs[0].token_ids == resumed.outputs[0].token_ids
    second.check_integrity()


def test_refuses_another_models_cache(checkpoints, tmp_path):
    a, b = checkpoints
    e = engine(a)
    run(e, "x", list(range(20, 40)))
    e.save_cache(str(tmp_path / "kv"))
    with pytest.raises(ValueError, match="another model"):
        engine(b).load_cache(str(tmp_path / "kv"))
    index = json.loads((tmp_path / "kv" / "index.json").read_text())
    assert index["format"] == "pensieve-kv-v1" and len(index["keys"]) > 0


def test_loading_never_evicts_and_fills_most_recent_first(checkpoints, tmp_path):
    ckpt, _ = checkpoints
    e = engine(ckpt, cpu=64)
    for i in range(4):
        run(e, f"c{i}", [100 + 10 * i + j for j in range(17)], conv=f"c{i}")
    saved = e.save_cache(str(tmp_path / "kv"))
    small = engine(ckpt, cpu=6)
    assert small.load_cache(str(tmp_path / "kv")) == 6 < saved
    newest = small.kv.conversations["c3"].keys
    assert newest and all(small.kv.cpu.lookup(k) is not None for k in newest)   # the most recent conversation came back whole
    assert small.kv.num_free_gpu == small.kv.num_gpu_blocks            # and nothing was touched on the GPU
    small.check_integrity()


@pytest.mark.parametrize("kind", ["thread", "process"])
def test_async_engine_saves_at_shutdown_and_loads_at_start(checkpoints, tmp_path, kind):
    """Both engines behind the server (a thread of it, or `--engine-process`) persist the cache."""
    import asyncio

    from pensieve.engine.async_engine import AsyncEngine
    from pensieve.engine.engine_process import EngineProcess

    make = AsyncEngine if kind == "thread" else EngineProcess

    ckpt, _ = checkpoints
    cfg = EngineConfig(model=ModelConfig(model=str(ckpt), max_model_len=256),
                       cache=CacheConfig(block_size=BS, num_gpu_blocks=64, num_cpu_blocks=64,
                                         persist_path=str(tmp_path / "kv")),
                       device="cpu", enforce_eager=True)
    prompt = list(range(30, 60))
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)

    async def turn(e: AsyncEngine, rid: str):
        outs = [o async for o in e.generate(rid, prompt, params)]
        return outs[-1]

    async def main() -> None:
        first = make(cfg)
        await turn(first, "a")
        await first.shutdown()
        second = make(cfg)              # a restart: the cache comes back from disk
        out = await turn(second, "b")
        assert out.cache.cpu_hit_tokens == ((len(prompt) - 1) // BS) * BS
        await second.shutdown()

    asyncio.run(main())
