"""Hot conversations survive a restart, and a saved cache never serves wrong KV: every persistence
fault (damaged blocks, a kill at any point of a save, cut or missing files, a full disk, an
unwritable path, another model or layout) gives the right answers or a clear refusal."""
from __future__ import annotations

import errno
import json
import logging
from pathlib import Path

import pytest

from pensieve.cache import persist
from pensieve.cache.persist import CacheError
from pensieve.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from pensieve.engine.llm_engine import LLMEngine
from pensieve.model.random_checkpoint import make_random_checkpoint
from pensieve.sampling_params import SamplingParams

BS = 4
PROMPT_A = list(range(20, 45))
PROMPT_B = list(range(60, 87))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    a = make_random_checkpoint(tmp_path_factory.mktemp("a"), "llama", seed=5, initializer_range=0.1)
    b = make_random_checkpoint(tmp_path_factory.mktemp("b"), "llama", seed=6, initializer_range=0.1)
    return a, b


def engine(path, mode="tiered", gpu=64, cpu=64, persist_path=None, strict=False) -> LLMEngine:
    return LLMEngine(EngineConfig(
        model=ModelConfig(model=str(path), max_model_len=256),
        cache=CacheConfig(block_size=BS, cache_mode=mode, num_gpu_blocks=gpu, num_cpu_blocks=cpu,
                          persist_path=None if persist_path is None else str(persist_path), persist_strict=strict),
        scheduler=SchedulerConfig(max_num_batched_tokens=64), device="cpu", enforce_eager=True))


def run(e: LLMEngine, rid: str, prompt: list[int], conv: str | None = None):
    e.add_request(rid, prompt, SamplingParams(temperature=0, max_tokens=5, ignore_eos=True), conv)
    done = {}
    while e.has_unfinished():
        for out in e.step():
            if out.finished:
                done[out.request_id] = out
    return done[rid]


def current(root: Path) -> Path:
    return root / (root / "CURRENT").read_text().strip()


def reseal(directory: Path, **changes) -> None:
    """Edit the manifest and give it a valid checksum again (a well-formed save of another layout)."""
    manifest = json.loads((directory / "index.json").read_text())
    manifest.update(changes)
    persist.write_manifest(directory, {k: v for k, v in manifest.items() if k != "checksum"})


@pytest.fixture(scope="module")
def reference(checkpoints):
    """Greedy answers without any cache for A's and B's follow-up turns, and the saves they come from."""
    ckpt, _ = checkpoints
    first = engine(ckpt)
    a, b = run(first, "a", PROMPT_A, "A"), run(first, "b", PROMPT_B, "B")
    follow = {"A": a.prompt_token_ids + a.outputs[0].token_ids + [7, 8, 9],
              "B": b.prompt_token_ids + b.outputs[0].token_ids + [5, 6]}
    cold = engine(ckpt, "stateless")
    return follow, {cid: run(cold, cid, hist).outputs[0].token_ids for cid, hist in follow.items()}


def assert_right_answers(e: LLMEngine, reference, convs=("A", "B")) -> None:
    follow, answers = reference
    for cid in convs:
        assert run(e, f"{cid}-next", follow[cid], cid).outputs[0].token_ids == answers[cid], cid
    e.check_integrity()


def save_a_and_b(ckpt, root: Path) -> int:
    e = engine(ckpt)
    run(e, "a", PROMPT_A, "A")
    run(e, "b", PROMPT_B, "B")
    return e.save_cache(str(root))


# ------------------------------------------------------------------ round trips
@pytest.mark.parametrize("mode", ["tiered", "gpu"])
def test_restart_keeps_conversations_and_answers(checkpoints, tmp_path, mode):
    ckpt, _ = checkpoints
    first = engine(ckpt, mode, cpu=64 if mode == "tiered" else 0)
    t0 = run(first, "t0", list(range(20, 45)), conv="chat")
    history = t0.prompt_token_ids + t0.outputs[0].token_ids + [7, 8, 9]
    saved = first.save_cache(str(tmp_path / "kv"))
    assert saved == len(first.kv.cached_blocks()) > 0

    second = engine(ckpt, mode, cpu=64 if mode == "tiered" else 0)
    assert second.load_cache(str(tmp_path / "kv")) == persist.LoadReport(saved, 0, 0)
    assert "chat" in second.kv.conversations
    assert second.kv.conversations["chat"].tokens == t0.prompt_token_ids + t0.outputs[0].token_ids  # appendable
    second.check_integrity()
    resumed = run(second, "t1", history, conv="chat")
    hits = resumed.cache.cpu_hit_tokens if mode == "tiered" else resumed.cache.gpu_hit_tokens
    assert hits == ((len(t0.prompt_token_ids) + 5 - 1) // BS) * BS     # every computed block came back

    cold = engine(ckpt, "stateless")
    assert run(cold, "t1", history).outputs[0].token_ids == resumed.outputs[0].token_ids
    second.check_integrity()


def test_loading_never_evicts_and_fills_most_recent_first(checkpoints, tmp_path):
    ckpt, _ = checkpoints
    e = engine(ckpt, cpu=64)
    for i in range(4):
        run(e, f"c{i}", [100 + 10 * i + j for j in range(17)], conv=f"c{i}")
    saved = e.save_cache(str(tmp_path / "kv"))
    small = engine(ckpt, cpu=6)
    report = small.load_cache(str(tmp_path / "kv"))
    assert report.loaded == 6 and report.skipped == saved - 6 and report.bad == 0
    newest = small.kv.conversations["c3"].keys
    assert newest and all(small.kv.cpu.lookup(k) is not None for k in newest)   # the most recent conversation came back whole
    assert small.kv.num_free_gpu == small.kv.num_gpu_blocks            # and nothing was touched on the GPU
    small.check_integrity()


def test_a_save_replaces_the_previous_one_whole(checkpoints, tmp_path):
    ckpt, _ = checkpoints
    root = tmp_path / "kv"
    e = engine(ckpt)
    run(e, "a", PROMPT_A, "A")
    e.save_cache(str(root))
    first = current(root)
    run(e, "b", PROMPT_B, "B")
    e.save_cache(str(root))
    assert current(root) != first and not first.exists()            # the older save is gone
    assert sorted(p.name for p in root.iterdir()) == sorted(["CURRENT", current(root).name])
    manifest = json.loads((current(root) / "index.json").read_text())
    assert manifest["format"] == "pensieve-kv-v2" and manifest["tp_size"] == 1
    assert len(manifest["checksums"]) == 1 and len(manifest["checksums"][0]) == len(manifest["keys"]) > 0


# ------------------------------------------------------------------ damaged blocks
def test_damaged_blocks_are_dropped_counted_and_recomputed(checkpoints, tmp_path, reference, caplog):
    ckpt, _ = checkpoints
    root = tmp_path / "kv"
    saved = save_a_and_b(ckpt, root)
    shard = current(root) / "kv.0.bin"
    data = bytearray(shard.read_bytes())
    record = len(data) // saved
    damaged = list(range(0, saved, 2))
    for i in damaged:   # same size, plausible KV: another block's bytes
        j = (i + 1) % saved
        data[i * record:(i + 1) * record] = data[j * record:(j + 1) * record]
    shard.write_bytes(bytes(data))

    with caplog.at_level(logging.WARNING, logger="pensieve.engine.llm_engine"):
        e = engine(ckpt, persist_path=root)
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and f"{len(damaged)} saved KV blocks failed their checksum" in warned[0]
    assert e.kv.num_used_cpu == saved - len(damaged)
    assert_right_answers(e, reference)

    with pytest.raises(CacheError, match="fail their checksum"):
        engine(ckpt, persist_path=root, strict=True)


def test_a_block_of_another_key_fails_its_checksum(tmp_path):
    """Checksums cover the key too: the same bytes listed under another key (an older manifest beside
    newer blocks) do not pass."""
    import torch

    blocks = [(bytes([i]) * 16, torch.full((2, 2, 4), float(i))) for i in range(3)]
    sums = persist.write_shard(tmp_path / "kv.0.bin", blocks)
    record = blocks[0][1].numel() * 4
    keys = [k for k, _ in blocks]
    assert persist.verify_shard(tmp_path / "kv.0.bin", keys, sums, record) == set()
    assert persist.verify_shard(tmp_path / "kv.0.bin", [keys[1], keys[0], keys[2]], sums, record) == {0, 1}


# ------------------------------------------------------------------ a kill during a save
class Killed(BaseException):
    """Stands for SIGKILL: nothing after the point of death runs, no cleanup either."""


@pytest.mark.parametrize("point", ["writing blocks", "before the rename", "before CURRENT", "after CURRENT"])
def test_a_kill_at_any_point_of_a_save_leaves_a_whole_save(checkpoints, tmp_path, reference, monkeypatch, point):
    ckpt, _ = checkpoints
    root = tmp_path / "kv"
    e = engine(ckpt)
    run(e, "a", PROMPT_A, "A")
    e.save_cache(str(root))                     # the previous save: A only
    run(e, "b", PROMPT_B, "B")

    def die(*args, **kw):
        raise Killed(point)

    if point == "writing blocks":
        calls = {"n": 0}
        real_write = persist._write

        def write_some(f, data):
            calls["n"] += 1
            if calls["n"] == 3:
                raise Killed(point)
            real_write(f, data)

        monkeypatch.setattr(persist, "_write", write_some)
    elif point == "before the rename":
        monkeypatch.setattr(persist.os, "rename", die)
    elif point == "before CURRENT":
        monkeypatch.setattr(persist.os, "replace", die)
    else:
        monkeypatch.setattr(persist.shutil, "rmtree", die)   # killed while removing the older save
    with pytest.raises(Killed):
        e.save_cache(str(root))
    monkeypatch.undo()

    restarted = engine(ckpt, persist_path=root, strict=True)   # whatever is current is whole and valid
    has_b = "B" in restarted.kv.conversations
    assert has_b == (point == "after CURRENT")
    assert "A" in restarted.kv.conversations
    assert_right_answers(restarted, reference)
    restarted.save_cache(str(root))             # the next save clears what the kill left behind
    assert sorted(p.name for p in root.iterdir()) == sorted(["CURRENT", current(root).name])


# ------------------------------------------------------------------ damaged, missing, foreign saves
def _cut_shard(d: Path) -> None:
    shard = d / "kv.0.bin"
    shard.write_bytes(shard.read_bytes()[:-100])


DAMAGE = {
    "truncated blocks": _cut_shard,
    "missing blocks": lambda d: (d / "kv.0.bin").unlink(),
    "empty blocks": lambda d: (d / "kv.0.bin").write_bytes(b""),
    "half manifest": lambda d: (d / "index.json").write_text((d / "index.json").read_text()[:200]),
    "empty manifest": lambda d: (d / "index.json").write_text(""),
    "missing manifest": lambda d: (d / "index.json").unlink(),
    "edited manifest": lambda d: (d / "index.json").write_text(   # a conversation's first token
        (d / "index.json").read_text().replace('"tokens": [20,', '"tokens": [21,', 1)),
    "damaged CURRENT": lambda d: (d.parent / "CURRENT").write_text("save-../../etc\n"),
    "empty CURRENT": lambda d: (d.parent / "CURRENT").write_bytes(b""),
    "missing save": lambda d: [p.unlink() for p in d.iterdir()] and d.rmdir(),
    "older format": lambda d: (d.parent / "CURRENT").unlink() or (d.parent / "index.json").write_text("{}"),
    "other tp_size": lambda d: reseal(d, tp_size=2),
    "other dtype": lambda d: reseal(d, dtype="torch.float16"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_an_unusable_save_gives_one_line_and_an_empty_cache_or_a_refusal(checkpoints, tmp_path, reference,
                                                                        caplog, damage):
    ckpt, _ = checkpoints
    root = tmp_path / "kv"
    save_a_and_b(ckpt, root)
    DAMAGE[damage](current(root))

    with caplog.at_level(logging.INFO):
        e = engine(ckpt, persist_path=root)
    lines = [r for r in caplog.records if r.name.startswith("pensieve") and r.levelno >= logging.WARNING]
    assert len(lines) == 1 and "starting with an empty cache" in lines[0].getMessage(), lines
    assert lines[0].exc_info is None                                    # a line, not a traceback
    assert e.kv.num_used_cpu == 0 and len(e.kv.conversations) == 0
    assert_right_answers(e, reference)

    with pytest.raises(CacheError) as refused:
        engine(ckpt, persist_path=root, strict=True)
    assert "\n" not in str(refused.value)


def test_another_models_save_is_refused(checkpoints, tmp_path):
    a, b = checkpoints
    root = tmp_path / "kv"
    save_a_and_b(a, root)
    with pytest.raises(CacheError, match="another model"):
        engine(b).load_cache(str(root))
    e = engine(b, persist_path=root)   # not strict: an empty cache
    assert e.kv.num_used_cpu == 0


# ------------------------------------------------------------------ saving into a bad place
def test_an_unwritable_path_is_refused_at_start(checkpoints, tmp_path):
    ckpt, _ = checkpoints
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(CacheError, match="not writable"):
        engine(ckpt, persist_path=blocker / "kv")   # (root ignores permissions: a file in the way)
    with pytest.raises(CacheError, match="not writable"):
        engine(ckpt, persist_path=blocker)


def test_a_full_disk_keeps_the_previous_save_and_cleans_up(checkpoints, tmp_path, reference, monkeypatch, caplog):
    ckpt, _ = checkpoints
    root = tmp_path / "kv"
    e = engine(ckpt, persist_path=root)
    run(e, "a", PROMPT_A, "A")
    e.save_cache(str(root))                     # the previous save: A only
    before = current(root)
    run(e, "b", PROMPT_B, "B")
    calls = {"n": 0}
    real_write = persist._write

    def fill_up(f, data):
        calls["n"] += 1
        if calls["n"] > 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(f, data)

    monkeypatch.setattr(persist, "_write", fill_up)
    with pytest.raises(CacheError, match="No space left"):
        e.save_cache(str(root))
    assert sorted(p.name for p in root.iterdir()) == sorted(["CURRENT", before.name])   # no partial save left
    with caplog.at_level(logging.ERROR):
        outputs, saved = e.close([])           # the shutdown save fails the same way: logged, not raised
    assert saved is None and any("No space left" in r.getMessage() for r in caplog.records)
    monkeypatch.undo()

    restarted = engine(ckpt, persist_path=root, strict=True)
    assert "A" in restarted.kv.conversations and "B" not in restarted.kv.conversations
    assert_right_answers(restarted, reference)


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

    async def turn(e, rid: str):
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

    (tmp_path / "kv" / "CURRENT").write_text("garbage")
    strict = EngineConfig(model=cfg.model, cache=CacheConfig(block_size=BS, num_gpu_blocks=64, num_cpu_blocks=64,
                                                             persist_path=str(tmp_path / "kv"), persist_strict=True),
                          device="cpu", enforce_eager=True)
    with pytest.raises(Exception) as refused:   # the process engine's start failure names the cause
        make(strict)
    assert isinstance(refused.value, CacheError) or isinstance(refused.value.__cause__, CacheError)
