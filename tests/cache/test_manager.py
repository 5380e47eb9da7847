"""The two-tier KV manager as plain logic: admission, reuse, eviction, swaps, drops, deletion."""
import numpy as np
import pytest

from pensieve.cache.block_keys import block_keys
from pensieve.cache.block_tier import CacheIntegrityError
from pensieve.cache.manager import KVCacheManager
from pensieve.cache.policy import LRUPolicy, RecomputeCost, RetentionValuePolicy, lowest
from pensieve.config import CacheConfig

BS = 4


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def make(num_gpu: int, num_cpu: int, mode: str = "tiered", policy: str = "retention", **kw) -> tuple[KVCacheManager, Clock]:
    clock = Clock()
    cfg = CacheConfig(block_size=BS, cache_mode=mode, eviction_policy=policy, **kw)
    pol = RetentionValuePolicy(BS) if policy == "retention" else LRUPolicy()
    return KVCacheManager(cfg, num_gpu, num_cpu, pol, clock), clock


def finish_step(kv: KVCacheManager) -> None:
    """Step end, with every ahead-of-time swap-out reported landed (as the copy stream would)."""
    kv.end_step()
    kv.swap_outs_done(kv.num_swap_out_groups)


def run_turn(kv: KVCacheManager, tokens: list[int], conv: str | None = None):
    """Admit, 'compute' and commit every block, release: one finished turn."""
    keys = block_keys(tokens, BS)
    adm = kv.admit(keys, len(tokens), reserve=0, conversation_id=conv)
    assert adm is not None
    for i in range(len(tokens) // BS):
        kv.commit_block(adm.block_table, i, keys[i])
    plan = kv.take_plan()
    finish_step(kv)
    table = list(adm.block_table)
    kv.release(adm.block_table)
    if conv is not None:
        kv.record_conversation(conv, keys[:(len(tokens) - 1) // BS])
    return adm, plan, table


def test_second_turn_reuses_every_full_block_but_the_last_token():
    kv, _ = make(16, 0, mode="gpu")
    turn1 = list(range(10))                      # blocks [0-3][4-7][8,9]
    adm1, _, _ = run_turn(kv, turn1)
    assert adm1.gpu_hit_tokens == 0 and adm1.pending == [(0, 10)]
    turn2 = turn1 + [100, 101, 102, 103, 104]   # 15 tokens
    adm2, _, _ = run_turn(kv, turn2)
    assert adm2.gpu_hit_tokens == 8             # blocks 0 and 1
    assert adm2.pending == [(8, 15)]
    kv.check_integrity()


def test_last_token_is_always_computed_even_if_cached():
    kv, _ = make(16, 0, mode="gpu")
    run_turn(kv, list(range(12)))
    adm, _, _ = run_turn(kv, list(range(12)))  # identical prompt, multiple of the block size
    assert adm.pending == [(8, 12)] and adm.gpu_hit_tokens == 8


def test_different_tokens_never_match():
    kv, _ = make(16, 0, mode="gpu")
    run_turn(kv, list(range(12)))
    adm, _, _ = run_turn(kv, [0, 1, 2, 99] + list(range(4, 12)))
    assert adm.gpu_hit_tokens == 0


def test_stateless_reuses_nothing_and_frees_everything():
    kv, _ = make(16, 0, mode="stateless")
    run_turn(kv, list(range(12)))
    adm, _, _ = run_turn(kv, list(range(12)))
    assert adm.gpu_hit_tokens == 0 and kv.num_free_gpu == 16
    kv.check_integrity()


def test_admission_refuses_what_does_not_fit_and_changes_nothing():
    kv, _ = make(4, 0, mode="gpu")
    keys = block_keys(list(range(20)), BS)
    assert kv.admit(keys, 20, reserve=0) is None
    assert kv.num_free_gpu == 4
    kv.check_integrity()


def test_retention_value_evicts_leading_blocks_and_idle_conversations_first():
    pol = RetentionValuePolicy(16, RecomputeCost(100.0, 1.0, 1.0))
    last = np.array([0.0, 0.0, 0.0, 9.0])
    idx = np.array([0, 1, 2, 0])
    order = lowest(pol.scores(last, idx, now=10.0), 4)
    assert list(order[:3]) == [0, 1, 2]  # the idle conversation, leading block first
    lru = LRUPolicy()
    assert list(lowest(lru.scores(last, idx, now=10.0), 4)) == [0, 1, 2, 3]


def test_gpu_mode_eviction_drops_leading_blocks_and_recomputes_them():
    kv, clock = make(6, 0, mode="gpu")
    a = list(range(16))                     # 4 blocks
    run_turn(kv, a, conv="a")
    clock.t = 1.0
    run_turn(kv, [500 + i for i in range(8)], conv="b")  # needs 2 more: the pool has 2 free
    clock.t = 2.0
    run_turn(kv, [900 + i for i in range(8)], conv="c")  # evicts 2 of a's blocks: the leading ones
    clock.t = 3.0
    adm, _, _ = run_turn(kv, a + [1, 2], conv="a")
    # blocks 0,1 dropped, block 2 on the GPU, block 3 evicted by this admission itself? no: it is a hit
    assert adm.gpu_hit_tokens == 8
    assert adm.pending == [(0, 8), (16, 18)]  # the dropped prefix, then the new tokens
    assert adm.recomputed_tokens == 8
    assert kv.counters.dropped_blocks >= 2
    kv.check_integrity()


def test_tiered_swaps_out_ahead_of_time_then_swaps_back_in():
    kv, clock = make(8, 16, mode="tiered", swap_out_watermark=0.5)
    a = list(range(16))
    run_turn(kv, a, conv="a")                 # 4 blocks cached, 4 free (< 50%? no: == 4 -> not under)
    clock.t = 1.0
    b = [300 + i for i in range(12)]
    keys_b = block_keys(b, BS)
    adm = kv.admit(keys_b, len(b), reserve=0)  # 3 blocks: 1 free left
    kv.plan_swap_out()                         # under the watermark: copy a's coldest blocks out
    plan = kv.take_plan()
    assert len(plan.swap_out) >= 3 and not plan.evict_out
    finish_step(kv)
    kv.release(adm.block_table)
    clock.t = 2.0
    run_turn(kv, [700 + i for i in range(24)])  # 6 blocks: evicts a's blocks from the GPU (already backed)
    clock.t = 3.0
    adm, plan, _ = run_turn(kv, a + [7], conv="a")
    assert adm.cpu_hit_tokens > 0 and len(plan.swap_in) == adm.cpu_hit_tokens // BS
    assert adm.gpu_hit_tokens + adm.cpu_hit_tokens + adm.recomputed_tokens >= 12
    kv.check_integrity()


def test_cpu_full_drops_the_least_valuable_and_reports_recompute():
    kv, clock = make(6, 2, mode="tiered", swap_out_watermark=1.0)
    for t, base in enumerate([0, 100, 200]):
        clock.t = float(t)
        run_turn(kv, [base + i for i in range(17)], conv=f"c{t}")
        kv.plan_swap_out()
        kv.take_plan()
        finish_step(kv)
    assert kv.counters.swapped_out_blocks >= 2
    kv.check_integrity()
    clock.t = 10.0
    adm, _, _ = run_turn(kv, [i for i in range(17)] + [5], conv="c0")
    assert adm.gpu_hit_tokens + adm.cpu_hit_tokens + adm.recomputed_tokens == 16
    kv.check_integrity()


def test_swap_out_ahead_of_time_never_drops_cpu_content():
    """With the CPU tier full of blocks only it holds, ahead-of-time copies wait: the GPU blocks
    stay unbacked and nothing is dropped until an eviction needs the space."""
    kv, clock = make(6, 2, mode="tiered", swap_out_watermark=1.0)
    run_turn(kv, list(range(9)), conv="old")          # 2 full blocks
    kv.plan_swap_out()
    assert len(kv.take_plan().swap_out) == 2          # copied to the 2 free CPU blocks
    finish_step(kv)
    clock.t = 1.0
    run_turn(kv, [500 + i for i in range(24)], conv="big")   # needs every GPU block: "old" leaves the GPU
    assert kv.num_used_cpu == 2 and all(kv.cpu_copy[b] < 0 for b in kv.gpu.idle())
    dropped = kv.counters.dropped_blocks
    clock.t = 2.0
    kv.plan_swap_out()                                 # the CPU tier holds only "old": no copy, no drop
    assert not kv.take_plan().swap_out and kv.counters.dropped_blocks == dropped
    finish_step(kv)
    clock.t = 3.0
    adm, plan, _ = run_turn(kv, [900 + i for i in range(13)])  # evicts "big" blocks: copies at eviction
    assert plan.evict_out and kv.num_used_cpu == 2
    kv.check_integrity()


def test_delete_conversation_frees_both_tiers():
    kv, clock = make(8, 8, mode="tiered", swap_out_watermark=1.0)
    run_turn(kv, list(range(17)), conv="x")
    kv.plan_swap_out()
    kv.take_plan()
    finish_step(kv)
    assert kv.num_used_cpu > 0 and kv.num_cached_gpu > 0
    assert kv.delete_conversation("x")
    assert not kv.delete_conversation("x")
    assert kv.num_free_gpu == 8 and kv.num_used_cpu == 0
    kv.check_integrity()


def test_conversation_ttl_expiry():
    kv, clock = make(8, 0, mode="gpu")
    run_turn(kv, list(range(9)), conv="old")
    clock.t = 100.0
    run_turn(kv, [50 + i for i in range(9)], conv="new")
    assert kv.expire_conversations(ttl=50.0) == ["old"]
    assert set(kv.conversations) == {"new"}
    kv.check_integrity()


def test_shared_prefix_survives_deleting_one_owner():
    kv, _ = make(16, 0, mode="gpu")
    system = list(range(8))
    run_turn(kv, system + [100, 101, 102, 103, 104], conv="a")
    run_turn(kv, system + [200, 201, 202, 203, 204], conv="b")
    kv.delete_conversation("a")
    adm, _, _ = run_turn(kv, system + [300, 301])
    assert adm.gpu_hit_tokens == 8


def next_prompt(rng, history: list[int], new_tokens: tuple[int, int], cap: int, managers, cid: str) -> list[int]:
    """A random workload's next turn: the conversation's last prompt plus a few random tokens; past `cap`
    tokens it is deleted from every manager and starts again from its last 5."""
    tokens = history + list(rng.integers(0, 50, size=rng.integers(*new_tokens)))
    if len(tokens) > cap:
        for kv in managers:
            kv.delete_conversation(cid)
        tokens = tokens[-5:]
    return tokens


@pytest.mark.parametrize("mode", ["stateless", "gpu", "tiered"])
def test_random_workload_keeps_invariants(mode):
    rng = np.random.default_rng(0)
    kv, clock = make(12, 10, mode=mode, swap_out_watermark=0.5)
    convs: dict[str, list[int]] = {}
    for step in range(200):
        clock.t = float(step)
        cid = f"c{rng.integers(6)}"
        tokens = next_prompt(rng, convs.get(cid, []), (1, 9), 40, [kv], cid)
        keys = block_keys(tokens, BS)
        adm = kv.admit(keys, len(tokens), reserve=0, conversation_id=cid)
        if adm is None:
            continue
        hits = adm.gpu_hit_tokens + adm.cpu_hit_tokens
        assert hits + sum(hi - lo for lo, hi in adm.pending) == len(tokens)
        for i in range(len(tokens) // BS):
            kv.commit_block(adm.block_table, i, keys[i])
        kv.plan_swap_out()
        kv.take_plan()
        finish_step(kv)
        kv.release(adm.block_table)
        kv.record_conversation(cid, keys[:(len(tokens) - 1) // BS])
        convs[cid] = tokens
        kv.check_integrity()
    for cid in list(convs):
        kv.delete_conversation(cid)
    kv.check_integrity()
    if mode != "stateless":
        # anonymous leftovers may stay cached; named ones are all gone
        assert not kv.conversations


def test_integrity_check_catches_corruption():
    kv, _ = make(8, 4, mode="tiered")
    run_turn(kv, list(range(9)), conv="x")
    kv.check_integrity()
    kv.gpu.free.append(kv.gpu.free[0])          # a block freed twice
    with pytest.raises(CacheIntegrityError, match="twice"):
        kv.check_integrity()
    kv.gpu.free.pop()
    b = kv.gpu.free[-1]
    kv.gpu.users[b] = 1                         # free and used at once
    with pytest.raises(CacheIntegrityError, match="free blocks"):
        kv.check_integrity()
    kv.gpu.users[b] = 0
    c = int(kv.cpu_copy[kv.gpu.idle()].max())
    kv.cpu.keys[c] = b"forged"                  # a CPU copy whose content differs from its GPU block
    with pytest.raises(CacheIntegrityError):
        kv.check_integrity()


def test_free_without_copy_gives_up_backed_blocks_only():
    """Tiered: idle blocks with a CPU copy are freed, least valuable first, with no copy planned and
    nothing dropped; unbacked idle blocks stay. Too few backed blocks: False, nothing changes."""
    kv, clock = make(8, 16, mode="tiered", swap_out_watermark=1.0)
    a = list(range(17))
    run_turn(kv, a, conv="a")                     # 4 full blocks cached
    kv.plan_swap_out()
    assert len(kv.take_plan().swap_out) == 4     # all backed
    finish_step(kv)
    clock.t = 1.0
    _, _, b_table = run_turn(kv, [300 + i for i in range(12)], conv="b")   # 3 more, not copied
    assert kv.num_free_gpu == 1
    a_keys = block_keys(a, BS)[:4]
    assert kv.free_without_copy(3)
    assert kv.num_free_gpu == 3 and not kv.take_plan() and kv.counters.dropped_blocks == 0
    assert all(kv.gpu.has_content[b] for b in b_table)                  # b's unbacked blocks stay
    assert [kv.gpu.lookup(k) is None for k in a_keys] == [True, True, False, False]   # leading blocks first
    assert all(kv.cpu.lookup(k) is not None for k in a_keys)            # their content stays on the CPU
    assert not kv.free_without_copy(6) and kv.num_free_gpu == 3         # 2 backed left, 3 more wanted
    kv.check_integrity()
    clock.t = 2.0
    adm, plan, _ = run_turn(kv, a + [5], conv="a")
    assert adm.gpu_hit_tokens == 2 * BS and adm.cpu_hit_tokens == 2 * BS and len(plan.swap_in) == 2
    kv.check_integrity()


def test_free_without_copy_evicts_as_allocation_would_without_a_cpu_tier():
    kv, _ = make(8, 0, mode="gpu")
    run_turn(kv, list(range(17)), conv="a")
    assert kv.num_free_gpu == 4
    assert kv.free_without_copy(6) and kv.num_free_gpu == 6 and kv.counters.dropped_blocks == 2
    assert not kv.free_without_copy(9) and kv.num_free_gpu == 6
    stateless, _ = make(8, 0, mode="stateless")
    assert stateless.free_without_copy(8) and not stateless.free_without_copy(9)
    kv.check_integrity()


def test_swap_out_pins_outlive_their_step_until_reported_done():
    kv, clock = make(8, 8, mode="tiered", swap_out_watermark=1.0)
    run_turn(kv, list(range(17)), conv="x")
    kv.plan_swap_out()
    plan = kv.take_plan()
    assert plan.swap_out
    kv.end_step()
    # the copies may still be running: their sources stay pinned, so nothing can reuse them
    assert kv.num_swap_out_groups == 1
    pinned = [b for b, _ in plan.swap_out]
    assert all(kv.gpu.users[b] == 1 and b not in kv.gpu.idle() for b in pinned)
    with pytest.raises(CacheIntegrityError, match="in flight"):
        kv.check_integrity()
    kv.swap_outs_done(1)
    assert all(b in kv.gpu.idle() for b in pinned)
    kv.check_integrity()


def test_profiled_cost_interpolates_is_monotone_and_extrapolates():
    from pensieve.cache.policy import ProfiledCost

    timings = {0: 1.0, 256: 1.2, 512: 1.1, 1024: 2.0}  # 512 is timing noise below 256's
    cost = ProfiledCost.measure(lambda n: timings[n], max_context=1024)
    assert cost.context_tokens == (0.0, 256.0, 512.0, 1024.0)
    assert cost.seconds == (1.0, 1.2, 1.2, 2.0)
    got = cost(np.array([0, 128, 768, 2048]))
    assert np.allclose(got, [1.0, 1.1, 1.6, 3.6])
    pol = RetentionValuePolicy(16, cost)
    # same idle time: leading blocks are cheaper to rebuild, so they go first
    assert list(lowest(pol.scores(np.zeros(3), np.array([40, 0, 10]), now=5.0), 3)) == [1, 2, 0]


class _RescoringManager(KVCacheManager):
    """The reference for eviction: rank every idle block afresh before each eviction from either tier."""

    kept = dropped = 0   # how often the CPU's least valuable block outranked the victim, or was dropped for it

    def _least_valuable_gpu(self, k):
        cand = self.gpu.idle()
        scores = self.policy.scores(self.gpu.last_use[cand], self.gpu.position[cand], self.clock())
        return [(int(cand[j]), float(scores[j])) for j in np.argsort(scores, kind="stable")[:k]]

    def _allocate_cpu(self, incoming_score):
        if self.cpu.free:
            return self.cpu.take_free()
        cand = self.cpu.idle()
        if len(cand) == 0:
            return None
        scores = self.policy.scores(self.cpu.last_use[cand], self.cpu.position[cand], self.clock())
        j = int(np.argmin(scores))
        if scores[j] >= incoming_score:
            self.kept += 1
            return None
        self.dropped += 1
        self._drop_cpu(int(cand[j]))
        return self.cpu.take_free()


@pytest.mark.parametrize("policy", ["retention", "lru"])
@pytest.mark.parametrize("aot", [False, True], ids=["copy-at-eviction", "ahead-of-time"])
def test_step_rankings_evict_what_rescoring_would(policy, aot):
    """Ranking each tier once per step decides exactly as ranking before every eviction does: the same
    transfers, drops, block tables and placement at every step of a workload that keeps both tiers full,
    with several sequences growing and new turns admitted in each step (so one ranking serves many
    evictions, across blocks taken, hit and pinned since it was made)."""
    # without ahead-of-time copies every GPU victim goes through the CPU allocation under test
    cfg = CacheConfig(block_size=BS, cache_mode="tiered", eviction_policy=policy, ahead_of_time_swap_out=aot,
                      swap_out_watermark=0.3)
    clock = Clock()
    managers = [cls(cfg, 40, 12, RetentionValuePolicy(BS) if policy == "retention" else LRUPolicy(), clock)
                for cls in (KVCacheManager, _RescoringManager)]
    rng = np.random.default_rng(1)
    hot = np.array([8.0] * 3 + [1.0] * 9)  # three conversations come back often, nine rarely
    convs: dict[str, list[int]] = {}
    running: dict[str, tuple[list[int], list[list[int]]]] = {}   # conversation -> (tokens, each manager's table)
    for step in range(400):
        clock.t = float(step)
        plans = []
        for cid, (tokens, tables) in list(running.items()):         # decode: each grows a few tokens
            tokens += list(rng.integers(0, 50, size=rng.integers(1, 4)))
            grown = [kv.grow(t, len(tokens)) for kv, t in zip(managers, tables)]
            plans.append(grown)
            if not all(grown):                                       # no room: preempted
                for kv, t in zip(managers, tables):
                    kv.release(t)
                del running[cid]
        for _ in range(rng.integers(1, 3)):                          # and new turns come in
            idle = [f"c{i}" for i in range(12) if f"c{i}" not in running]
            w = np.array([hot[int(c[1:])] for c in idle])
            cid = str(rng.choice(idle, p=w / w.sum()))
            tokens = next_prompt(rng, convs.get(cid, []), (2, 12), 48, managers, cid)
            keys = block_keys(tokens, BS)
            adms = [kv.admit(keys, len(tokens), reserve=0, conversation_id=cid) for kv in managers]
            plans.append([None if a is None else (list(a.block_table), a.pending) for a in adms])
            if adms[0] is not None and adms[1] is not None:
                for kv, adm in zip(managers, adms):
                    for i in range(len(tokens) // BS):
                        kv.commit_block(adm.block_table, i, keys[i])
                running[cid] = (tokens, [a.block_table for a in adms])
        for kv in managers:
            kv.plan_swap_out()
        steps = [kv.take_plan() for kv in managers]
        plans.append([(p.swap_in, p.swap_out, p.evict_out) for p in steps])
        for kv in managers:
            finish_step(kv)
        for cid in [c for c in running if rng.random() < 0.3]:       # some turns end
            tokens, tables = running.pop(cid)
            keys = block_keys(tokens, BS)
            for kv, table in zip(managers, tables):
                for i in range(len(tokens) // BS):
                    kv.commit_block(table, i, keys[i])
                kv.release(table)
                kv.record_conversation(cid, keys[:(len(tokens) - 1) // BS])
            convs[cid] = tokens
        for p in plans:
            assert p[0] == p[1], f"step {step}"
        assert managers[0].counters == managers[1].counters
        for tier in ("gpu", "cpu"):
            a, b = getattr(managers[0], tier), getattr(managers[1], tier)
            assert a.keys == b.keys and np.array_equal(a.users, b.users), f"step {step}: {tier}"
    for kv in managers:
        kv.check_integrity()
    ref = managers[1]
    assert ref.counters.cpu_hit_tokens > 0 and ref.counters.dropped_blocks > 0    # reuse, and both tiers full
    if not aot:
        assert ref.kept > 20 and ref.dropped > 20, (ref.kept, ref.dropped)        # both branches of a drop


def test_clear_forgets_both_tiers_and_refuses_while_blocks_are_in_use():
    kv, clock = make(8, 16, mode="tiered", swap_out_watermark=1.0)
    a = list(range(17))
    run_turn(kv, a, conv="a")
    kv.plan_swap_out()
    kv.take_plan()
    finish_step(kv)
    run_turn(kv, [300 + i for i in range(12)], conv="b")
    keys = block_keys(a, BS)
    adm = kv.admit(keys, len(a), reserve=0)           # a running sequence holds blocks
    with pytest.raises(CacheIntegrityError, match="idle"):
        kv.clear()
    kv.take_plan()
    finish_step(kv)
    kv.release(adm.block_table)
    kv.clear()
    assert kv.num_free_gpu == 8 and kv.num_used_cpu == 0 and len(kv.conversations) == 0
    assert kv.counters.dropped_blocks == 0            # a reset is not a drop
    kv.check_integrity()
    adm, _, _ = run_turn(kv, a + [1], conv="a")
    assert adm.gpu_hit_tokens == adm.cpu_hit_tokens == 0
