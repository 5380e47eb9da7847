"""Async scheduling: decode step N+1 is scheduled and launched before step N's tokens are read.

Outputs lag one step and a request that stops at step N leaves a wasted row in step N+1; nothing
else may change. Every test runs the same work with it on and off and compares token for token.
"""
from __future__ import annotations

import os

import pytest

from pensieve.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from pensieve.engine.llm_engine import OVERLAP_REFUSALS, LLMEngine
from pensieve.model.random_checkpoint import make_random_checkpoint
from pensieve.sampling_params import SamplingParams

DEVICE = os.environ.get("PENSIEVE_TEST_DEVICE", "cpu")
MAX_LEN = 96


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_random_checkpoint(tmp_path_factory.mktemp("llama"), "llama", seed=5, initializer_range=0.1)


def make_engine(path, async_scheduling: bool, num_gpu_blocks: int = 96, mode: str = "tiered") -> LLMEngine:
    return LLMEngine(EngineConfig(
        model=ModelConfig(model=str(path), max_model_len=MAX_LEN),
        cache=CacheConfig(block_size=4, cache_mode=mode, num_gpu_blocks=num_gpu_blocks, num_cpu_blocks=64),
        scheduler=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64),
        device=DEVICE, enforce_eager=DEVICE == "cpu", async_scheduling=async_scheduling))


def drive(engine: LLMEngine, requests: dict, late: dict | None = None, aborts: dict | None = None) -> dict:
    """Run to the end; `late` and `aborts` map a step index to request ids added / aborted before it."""
    late, aborts = late or {}, aborts or {}
    done, step = {}, 0
    for rid in requests:
        if not any(rid in ids for ids in late.values()):
            engine.add_request(rid, *requests[rid])
    while engine.has_unfinished() or any(k >= step for k in late):
        for rid in late.get(step, ()):
            engine.add_request(rid, *requests[rid])
        for rid in aborts.get(step, ()):
            out = engine.abort_request(rid)
            if out is not None:
                done[rid] = out
        for out in engine.step():
            assert out.request_id not in done, f"{out.request_id} had output after it finished"
            if out.finished:
                done[out.request_id] = out
        step += 1
    engine.check_integrity()
    assert engine.stats().gpu_blocks_used == 0, "a finished or aborted request kept its blocks"
    return done


def reply(out) -> tuple:
    c = out.outputs[0]
    return c.token_ids, c.text, c.finish_reason, c.stop_reason


def prompt(i: int, n: int) -> list[int]:
    return [(7 * i + 13 * j) % 200 + 20 for j in range(n)]


def test_stops_found_late_give_the_same_replies(checkpoint):
    """Greedy and seeded rows, stop token ids and stop strings that end requests mid-decode (learnt
    from a first run), max_tokens and the context limit: identical replies, and overlapped steps ran."""
    greedy = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    probe = make_engine(checkpoint, async_scheduling=False)
    first = drive(probe, {f"r{i}": (prompt(i, 5 + i), greedy) for i in range(4)})
    stop_token = first["r0"].outputs[0].token_ids[6]
    stop_text = first["r1"].outputs[0].text[-12:-6]
    assert stop_text.strip(), "the probe's text gave no stop string"
    requests = {
        "r0": (prompt(0, 5), SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop_token_ids=[stop_token])),
        "r1": (prompt(1, 6), SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=[stop_text])),
        "r2": (prompt(2, 7), SamplingParams(temperature=0.8, top_p=0.9, seed=11, max_tokens=17, ignore_eos=True)),
        "r3": (prompt(3, 8), SamplingParams(temperature=0, max_tokens=9, ignore_eos=True, logprobs=2)),
        "r4": (prompt(4, MAX_LEN - 12), SamplingParams(temperature=0, max_tokens=None, ignore_eos=True)),  # runs into the context
        "r5": (prompt(5, 4), SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)),
    }
    outs = {}
    for flag in (False, True):
        engine = make_engine(checkpoint, async_scheduling=flag)
        outs[flag] = drive(engine, requests)
        assert (engine.stats().steps_overlapped > 0) == flag
    assert set(outs[False]) == set(outs[True]) == set(requests)
    for rid in requests:
        assert reply(outs[True][rid]) == reply(outs[False][rid]), rid
    assert outs[True]["r0"].outputs[0].finish_reason == "stop" and outs[True]["r0"].outputs[0].stop_reason == stop_token
    assert outs[True]["r1"].outputs[0].stop_reason == stop_text
    assert outs[True]["r4"].outputs[0].finish_reason == "length"
    lp_on, lp_off = outs[True]["r3"].outputs[0].logprobs, outs[False]["r3"].outputs[0].logprobs
    assert len(lp_on) == 9 and [x[0] for x in lp_on] == pytest.approx([x[0] for x in lp_off], abs=1e-5)


def test_arrivals_aborts_and_penalties_during_decode(checkpoint):
    """Requests added and aborted while a decode step is in flight, and rows whose penalties need
    the host's tokens (those steps read back first): same replies, no block left behind."""
    base = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    requests = {f"a{i}": (prompt(10 + i, 6 + 2 * i), base) for i in range(5)}
    requests["pen"] = (prompt(20, 9), SamplingParams(temperature=0, max_tokens=12, ignore_eos=True,
                                                    repetition_penalty=1.3, presence_penalty=0.5))
    late = {4: ["a3"], 9: ["a4", "pen"]}
    outs = {}
    for flag in (False, True):
        engine = make_engine(checkpoint, async_scheduling=flag)
        outs[flag] = drive(engine, requests, late=late, aborts={6: ["a1"]})
        stats = engine.stats()
        assert (stats.steps_overlapped > 0) == flag
        refusals = {k: getattr(stats, f"not_overlapped_{k}") for k in OVERLAP_REFUSALS}
        if flag:   # every busy step ran overlapped or says why not; these requests meet three of the reasons
            assert stats.steps_overlapped + sum(refusals.values()) == step_count(stats), refusals
            assert all(refusals[k] > 0 for k in ("after_read_back", "waiting", "penalties")), refusals
        else:
            assert not any(refusals.values())
    assert outs[True]["a1"].outputs[0].finish_reason == "abort"
    for rid in requests:
        if rid != "a1":
            assert reply(outs[True][rid]) == reply(outs[False][rid]), rid


def test_growth_that_would_evict_reads_back_first(checkpoint):
    """A pool so small that the next decode token needs a cached block evicted: with no CPU tier the
    eviction is a drop, which an overlapped step may make; replies stay the same."""
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    requests = {f"g{i}": (prompt(30 + i, 10), params) for i in range(3)}
    outs = {}
    for flag in (False, True):
        engine = make_engine(checkpoint, async_scheduling=flag, num_gpu_blocks=24, mode="gpu")
        outs[flag] = drive(engine, {"warm": (prompt(40, 30), params)})   # leaves cached blocks behind
        outs[flag].update(drive(engine, requests))
        stats = engine.stats()
        assert (stats.steps_overlapped > 0) == flag
    assert stats.dropped_blocks > 0   # the cached blocks were evicted on the way
    for rid in outs[False]:
        assert reply(outs[True][rid]) == reply(outs[False][rid]), rid


def test_aborting_everything_leaves_the_engine_idle(checkpoint):
    """The last abort also settles the decode step left running: nothing unfinished, no block held."""
    engine = make_engine(checkpoint, async_scheduling=True)
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    for i in range(3):
        engine.add_request(f"x{i}", prompt(50 + i, 12), params)
    while engine.stats().steps_overlapped < 2:
        engine.step()
    assert engine.has_unfinished() and engine.kv.num_used_gpu > 0
    for i in range(3):
        assert engine.abort_request(f"x{i}").outputs[0].finish_reason == "abort"
    assert not engine.has_unfinished() and engine.kv.num_used_gpu == 0
    engine.check_integrity()


def step_count(stats) -> int:
    return stats.steps_graph + stats.steps_rows + stats.steps_eager + stats.steps_swapin


def test_growth_into_a_full_tiered_pool_frees_backed_blocks_and_stays_overlapped(checkpoint):
    """Tiered keeps the GPU pool full of idle cache, half of it copied to the CPU ahead of time. Decode
    steps that grow a sequence into a new block give up backed blocks (no copy to wait for) and stay
    overlapped: every decode step but the first and the last two (before this rule: 12 of 24 steps)."""
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    outs = {}
    for flag in (False, True):
        engine = make_engine(checkpoint, async_scheduling=flag, num_gpu_blocks=40)
        drive(engine, {f"w{i}": (prompt(60 + i, 30), params) for i in range(3)})   # fills the pool with cache
        kv = engine.kv
        assert kv.num_free_gpu <= 1 and (kv.cpu_copy[kv.gpu.idle()] >= 0).sum() >= 12
        before = engine.stats()
        outs[flag] = drive(engine, {f"g{i}": (prompt(30 + i, 10), params) for i in range(3)})
        after = engine.stats()
        steps, overlapped = step_count(after) - step_count(before), after.steps_overlapped - before.steps_overlapped
        assert after.dropped_blocks == 0
        refused = sum(getattr(after, f"not_overlapped_{k}") - getattr(before, f"not_overlapped_{k}")
                      for k in OVERLAP_REFUSALS)
        assert overlapped + refused == (steps if flag else 0)
    assert steps == 24 and overlapped >= steps - 4, (steps, overlapped)
    for rid in outs[False]:
        assert reply(outs[True][rid]) == reply(outs[False][rid]), rid


def test_requests_that_cannot_be_admitted_yet_do_not_stop_overlap(checkpoint):
    """A request waits for room in the pool while three others decode: it could not be admitted by a
    read-back step either, so the decode steps stay overlapped until room appears; then it is admitted
    at once, and every reply is the same as without async scheduling."""
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    big = (prompt(99, 84), SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))   # 23 blocks
    outs, waited = {}, {}
    for flag in (False, True):
        engine = make_engine(checkpoint, async_scheduling=flag, num_gpu_blocks=48, mode="stateless")
        for i in range(3):
            engine.add_request(f"d{i}", prompt(70 + i, 10), params)
        done = {}
        for _ in range(25):   # the three hold 9 blocks each by now, 13 at the end: no room for 23 more
            done.update({o.request_id: o for o in engine.step() if o.finished})
        engine.add_request("big", *big)
        before, steps_waiting = engine.stats(), 0
        while engine.stats().num_waiting:
            done.update({o.request_id: o for o in engine.step() if o.finished})
            steps_waiting += 1
        after = engine.stats()
        waited[flag] = (steps_waiting, after.steps_overlapped - before.steps_overlapped,
                        after.not_overlapped_waiting - before.not_overlapped_waiting)
        while engine.has_unfinished():
            done.update({o.request_id: o for o in engine.step() if o.finished})
        outs[flag] = done
        engine.check_integrity()
    steps_waiting, overlapped, refused = waited[True]
    assert steps_waiting > 10 and overlapped >= steps_waiting - 3 and refused <= 1, waited
    assert waited[False][0] >= steps_waiting - 2, waited   # admitted no later than one step behind
    for rid in outs[False]:
        assert reply(outs[True][rid]) == reply(outs[False][rid]), rid
