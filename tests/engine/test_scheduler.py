"""The scheduler on its own: plain Python over a real KVCacheManager, no model."""
from __future__ import annotations

import pytest

from pensieve.cache.manager import KVCacheManager
from pensieve.cache.policy import LRUPolicy
from pensieve.config import CacheConfig, SchedulerConfig
from pensieve.engine.scheduler import Scheduler
from pensieve.engine.sequence import SeqStatus, Sequence
from pensieve.sampling_params import SamplingParams

BS = 4


def make(gpu: int = 32, cpu: int = 0, mode: str = "gpu", seqs: int = 8, tokens: int = 64, **cache_kw):
    cache = CacheConfig(block_size=BS, cache_mode=mode, admit_watermark=0.0, **cache_kw)
    kv = KVCacheManager(cache, gpu, cpu, LRUPolicy())
    return Scheduler(SchedulerConfig(max_num_seqs=seqs, max_num_batched_tokens=tokens), cache, kv), kv


def seq(rid: str, tokens: list[int], conv: str | None = None) -> Sequence:
    return Sequence(rid, list(tokens), len(tokens), SamplingParams(max_tokens=4), 0.0, conv)


def finish_step(sched: Scheduler, plan, sampled: int = 7) -> None:
    """What the engine does after a step: append sampled tokens, commit computed blocks."""
    sched.kv.end_step()
    for chunk in plan.chunks:
        if chunk.sample:
            chunk.seq.append_token(sampled, BS)
        sched.commit_computed(chunk)


def test_a_prompt_over_the_token_budget_is_chunked_and_sampled_once():
    sched, _ = make(tokens=8)
    s = seq("a", range(20))
    sched.add(s)
    ranges = []
    for _ in range(3):
        plan = sched.schedule()
        [chunk] = plan.chunks
        ranges.append(chunk.ranges)
        assert chunk.sample == (chunk.ranges[-1][1] == 20)
        finish_step(sched, plan)
    assert ranges == [((0, 8),), ((8, 16),), ((16, 20),)]
    plan = sched.schedule()                       # then one decode token
    assert plan.chunks[0].ranges == ((20, 21),) and plan.chunks[0].sample


def test_running_sequences_go_first_and_the_budget_is_shared():
    sched, _ = make(tokens=10)
    a, b = seq("a", range(6)), seq("b", range(100, 112))
    sched.add(a)
    finish_step(sched, sched.schedule())           # a's prompt: 6 tokens
    sched.add(b)
    plan = sched.schedule()
    assert [c.seq.request_id for c in plan.chunks] == ["a", "b"]
    assert plan.chunks[0].num_tokens == 1 and plan.chunks[1].num_tokens == 9   # a's decode, then b's chunk
    assert not plan.chunks[1].sample


def test_the_sequence_cap_holds_admission_back():
    sched, _ = make(seqs=2)
    for i in range(3):
        sched.add(seq(f"s{i}", range(10 * i, 10 * i + 5)))
    plan = sched.schedule()
    assert len(plan.chunks) == 2 and len(sched.waiting) == 1 and sched.waiting[0].request_id == "s2"


def test_a_cached_prefix_is_not_computed_again():
    sched, kv = make()
    first = seq("t0", range(13))
    sched.add(first)
    plan = sched.schedule()
    finish_step(sched, plan)
    sched.finish(first)
    follow = seq("t1", list(range(13)) + [7, 50, 51, 52])
    sched.add(follow)
    [chunk] = sched.schedule().chunks
    # 3 full blocks (12 tokens) cached; the block holding the last token is always computed
    assert chunk.ranges == ((12, 17),)
    assert follow.cache.gpu_hit_tokens == 12


def test_when_blocks_run_out_the_newest_running_sequence_is_preempted():
    sched, kv = make(gpu=6, tokens=64)
    old, new = seq("old", range(10)), seq("new", range(100, 110))
    sched.add(old)
    sched.add(new)
    plan = sched.schedule()                        # 3 blocks each: the pool is full
    assert len(plan.chunks) == 2
    finish_step(sched, plan)
    old.token_ids += [1, 2]                        # old needs a 4th block for its next token
    old.pending = [(10, 13)]
    plan = sched.schedule()
    assert plan.preempted == (new,) and new.status is SeqStatus.WAITING and sched.waiting[0] is new
    assert [c.seq for c in plan.chunks] == [old] and sched.num_preemptions == 1
    assert new.block_table == [] and new.num_preemptions == 1


def test_a_returning_conversation_swaps_in_behind_other_work():
    """With other work in the step, a CPU hit is copied in behind it and computed next step."""
    sched, kv = make(gpu=8, cpu=16, mode="tiered", ahead_of_time_swap_out=False)
    first = seq("t0", range(9), conv="c")
    sched.add(first)
    finish_step(sched, sched.schedule())
    sched.finish(first)
    filler = seq("filler", range(200, 230))        # evicts the conversation's GPU blocks, copying them out
    sched.add(filler)
    plan = sched.schedule()
    assert len(plan.transfers.evict_out) == 2
    finish_step(sched, plan)
    sched.finish(filler)
    other = seq("other", range(300, 305))
    sched.add(other)
    finish_step(sched, sched.schedule())           # other work, running
    back = seq("t1", list(range(9)) + [7, 60, 61], conv="c")
    sched.add(back)
    plan = sched.schedule()
    assert [c.seq for c in plan.chunks] == [other]        # the returning turn waits one step ...
    assert plan.transfers.swap_in and not plan.swap_in_now  # ... while its blocks come in behind this step
    assert back.cache.cpu_hit_tokens == 8
    finish_step(sched, plan)
    plan = sched.schedule()
    assert back in [c.seq for c in plan.chunks] and not plan.transfers.swap_in


def test_schedule_decode_takes_placeholders_and_refuses_to_evict():
    """An overlapped decode step schedules the token still being sampled as a placeholder."""
    sched, kv = make(gpu=3)
    s = seq("a", range(11))
    sched.add(s)
    plan = sched.schedule()                        # the prompt; its sampled token is not read back yet
    kv.end_step()
    sched.commit_computed(plan.chunks[0])
    plan = sched.schedule_decode([s])
    assert s.unresolved and s.token_ids[-1] == -1 and plan.chunks[0].ranges == ((11, 12),)
    with pytest.raises(RuntimeError, match="one token in flight"):
        s.append_placeholder()
    s.append_token(9, BS)                          # the placeholder gets its value
    assert not s.unresolved and s.token_ids[-1] == 9 and len(s.block_keys) == 3
    with pytest.raises(RuntimeError, match="free blocks"):
        sched.schedule_decode([s])                 # a 4th block: the pool has none to grow into
