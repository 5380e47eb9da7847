"""The conversation KV manager: where each block's KV lives (GPU, CPU, nowhere) and what moves each step.

Plain Python and numpy over block ids: two `BlockTier`s (free lists, content indexes, users), the
links between a GPU block and its CPU copy, and the eviction policy on top. The tensors live in
`kv_pool` and are moved by `transfer.KVTransfer`. A content key (`block_keys`) may be registered in
both tiers at once: a GPU block copied to the CPU ahead of time keeps a link to its copy, so evicting
it from the GPU is just freeing.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from pensieve.cache.block_keys import BlockKey
from pensieve.cache.block_tier import BlockTier, CacheIntegrityError
from pensieve.cache.conversations import ConversationOwners
from pensieve.cache.policy import EvictionPolicy, lowest
from pensieve.config import CacheConfig


@dataclass
class TransferPlan:
    swap_in: list[tuple[int, int]] = field(default_factory=list)    # (cpu block, gpu block)
    swap_out: list[tuple[int, int]] = field(default_factory=list)   # (gpu block, cpu block), ahead of time
    evict_out: list[tuple[int, int]] = field(default_factory=list)  # (gpu block, cpu block) whose GPU block is
    #                                                                 reused this step: must land before the forward

    def __bool__(self) -> bool:
        return bool(self.swap_in or self.swap_out or self.evict_out)


@dataclass
class CacheCounters:
    gpu_hit_tokens: int = 0
    cpu_hit_tokens: int = 0
    recomputed_tokens: int = 0
    swapped_out_blocks: int = 0
    swapped_in_blocks: int = 0
    dropped_blocks: int = 0


@dataclass
class Admission:
    """What admitting a sequence produced: its block table and the positions it must compute."""

    block_table: list[int]
    pending: list[tuple[int, int]]   # [start, end) position ranges whose KV must be computed, ascending
    gpu_hit_tokens: int
    cpu_hit_tokens: int
    recomputed_tokens: int


class KVCacheManager:
    def __init__(
        self,
        cfg: CacheConfig,
        num_gpu_blocks: int,
        num_cpu_blocks: int,
        policy: EvictionPolicy,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cfg = cfg
        self.block_size = cfg.block_size
        self.reuse = cfg.cache_mode != "stateless"
        self.tiered = cfg.cache_mode == "tiered" and num_cpu_blocks > 0
        self.policy = policy
        self.clock = clock
        self.gpu = BlockTier("GPU", num_gpu_blocks)
        self.cpu = BlockTier("CPU", num_cpu_blocks if self.tiered else 0)
        # links between a GPU block and its CPU copy (-1: none)
        self.cpu_copy = np.full(self.gpu.num_blocks, -1, np.int64)
        self.gpu_copy = np.full(self.cpu.num_blocks, -1, np.int64)
        # this step's transfers and the pins they hold until the step ends
        self.plan = TransferPlan()
        self._pinned_gpu: list[int] = []
        self._pinned_cpu: list[int] = []
        # Ahead-of-time swap-outs outlive their step: they overlap later steps and their pins are
        # released, oldest group first, as the copy stream reports them done.
        self._out_gpu: list[int] = []
        self._out_cpu: list[int] = []
        self._outbound: deque[tuple[list[int], list[int]]] = deque()
        self.conversations = ConversationOwners()
        self.counters = CacheCounters()
        # each tier's idle blocks ranked for eviction (by tier name), shared by one step's evictions
        self._rankings: dict[str, _Ranking] = {}

    # ------------------------------------------------------------------ queries
    @property
    def num_gpu_blocks(self) -> int:
        return self.gpu.num_blocks

    @property
    def num_cpu_blocks(self) -> int:
        return self.cpu.num_blocks

    @property
    def num_free_gpu(self) -> int:
        return self.gpu.num_free

    @property
    def num_cached_gpu(self) -> int:
        return self.gpu.num_idle

    @property
    def num_used_gpu(self) -> int:
        return self.gpu.num_blocks - self.gpu.num_free - self.gpu.num_idle

    @property
    def num_used_cpu(self) -> int:
        return self.cpu.num_blocks - self.cpu.num_free

    def num_allocatable(self) -> int:
        return self.gpu.num_free + self.gpu.num_idle

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ------------------------------------------------------------- admission
    def admit(self, keys: list[BlockKey], num_tokens: int, reserve: int,
              conversation_id: str | None = None) -> Admission | None:
        """Reuse what is cached of a prompt and allocate the rest; None if it does not fit.

        Every full block before the one holding the last token is looked up on
        its own (keys chain the whole prefix), so a sequence whose leading
        blocks were dropped still reuses its cached middle: the missing blocks
        are recomputed in the same batch as the new tokens.
        """
        bs = self.block_size
        gpu, cpu = self.gpu, self.cpu
        num_blocks = self.blocks_needed(num_tokens)
        reusable = (num_tokens - 1) // bs if self.reuse else 0
        gpu_hits, cpu_hits = self._lookup(keys, num_tokens)
        if not self._room_for(num_blocks, gpu_hits, reserve):
            return None
        need = num_blocks - len(gpu_hits)
        now = self.clock()
        for b in gpu_hits.values():
            gpu.users[b] += 1
        for c in cpu_hits.values():  # pinned before allocating, so eviction cannot drop them
            cpu.users[c] += 1
            self._pinned_cpu.append(c)
        fresh = self._allocate_gpu(need)
        if fresh is None:
            raise CacheIntegrityError(f"{need} GPU blocks were counted allocatable but could not be allocated")
        table: list[int] = []
        for i in range(num_blocks):
            if i in gpu_hits:
                table.append(gpu_hits[i])
                continue
            b = fresh.pop()
            table.append(b)
            if i in cpu_hits:
                c = cpu_hits[i]
                gpu.register(b, keys[i], i, now)
                self._link(b, c)
                cpu.last_use[c] = now
                self.plan.swap_in.append((c, b))
        present = sorted([*gpu_hits, *cpu_hits])
        last_present = present[-1] if present else -1
        pending: list[tuple[int, int]] = []
        for i in range(num_blocks):
            if i in gpu_hits or i in cpu_hits:
                continue
            lo, hi = i * bs, min((i + 1) * bs, num_tokens)
            if pending and pending[-1][1] == lo:
                pending[-1] = (pending[-1][0], hi)
            else:
                pending.append((lo, hi))
        holes = sum(1 for i in range(last_present) if i not in gpu_hits and i not in cpu_hits)
        lost_tail = 0
        conv = self.conversations.get(conversation_id) if conversation_id else None
        if conv is not None:  # blocks this conversation had cached past the last surviving one
            lost_tail = sum(1 for i in range(last_present + 1, min(len(conv.keys), reusable))
                            if i < len(keys) and conv.keys[i] == keys[i])
        adm = Admission(table, pending, len(gpu_hits) * bs, len(cpu_hits) * bs, (holes + lost_tail) * bs)
        self.counters.gpu_hit_tokens += adm.gpu_hit_tokens
        self.counters.cpu_hit_tokens += adm.cpu_hit_tokens
        self.counters.recomputed_tokens += adm.recomputed_tokens
        self.counters.swapped_in_blocks += len(cpu_hits)
        return adm

    def fits(self, keys: list[BlockKey], num_tokens: int, reserve: int, taken_first: int = 0) -> bool:
        """Whether admit() would take this prompt now, after `taken_first` more blocks are allocated
        (the running sequences' growth, which the scheduler serves first). Changes nothing."""
        gpu_hits, _ = self._lookup(keys, num_tokens)
        return self._room_for(self.blocks_needed(num_tokens), gpu_hits, reserve + taken_first)

    def _lookup(self, keys: list[BlockKey], num_tokens: int) -> tuple[dict[int, int], dict[int, int]]:
        """The prompt's cached full blocks ({index in the sequence: block}, GPU then CPU). The block
        holding the last token is never reused: its KV is computed to sample the next token."""
        gpu_hits: dict[int, int] = {}
        cpu_hits: dict[int, int] = {}
        reusable = (num_tokens - 1) // self.block_size if self.reuse else 0
        for i in range(reusable):
            key = keys[i]
            b = self.gpu.lookup(key)
            if b is not None:
                gpu_hits[i] = b
            elif self.tiered and (c := self.cpu.lookup(key)) is not None:
                cpu_hits[i] = c
        return gpu_hits, cpu_hits

    def _room_for(self, num_blocks: int, gpu_hits: dict[int, int], reserve: int) -> bool:
        """Fresh blocks for what the GPU does not hold, beside `reserve` blocks left free; idle GPU
        hits count as taken (they stop being evictable)."""
        hits_idle = sum(1 for b in gpu_hits.values() if self.gpu.users[b] == 0)
        return num_blocks - len(gpu_hits) <= self.num_allocatable() - hits_idle - reserve

    def grow(self, block_table: list[int], num_tokens: int) -> bool:
        """Give a running sequence the blocks to hold `num_tokens` tokens; False if none are left."""
        need = self.blocks_needed(num_tokens) - len(block_table)
        if need <= 0:
            return True
        fresh = self._allocate_gpu(need)
        if fresh is None:
            return False
        block_table.extend(reversed(fresh))
        return True

    def free_without_copy(self, n: int) -> bool:
        """Make at least `n` GPU blocks free without planning a copy; False (nothing changed) if that
        cannot be done. Tiered gives up idle blocks whose content the CPU tier also holds (copied ahead
        of time), least valuable first; the GPU-only cache evicts as an allocation would (a drop). A
        decode step launched before the previous one is read back (async scheduling) grows this way:
        it cannot wait for an eviction copy, and with the pool full of idle cache, as tiered keeps it,
        nearly every step grows some sequence into a new block."""
        short = n - self.gpu.num_free
        if short <= 0:
            return True
        cand = self.gpu.idle()
        if self.tiered:
            cand = cand[self.cpu_copy[cand] >= 0]   # evicting these plans no copy
        if len(cand) < short:
            return False
        self._evict_gpu(short, cand)
        return True

    def commit_block(self, block_table: list[int], index: int, key: BlockKey) -> None:
        """Make a freshly computed full block findable by its content key."""
        if not self.reuse:
            return
        b = block_table[index]
        if self.gpu.has_content[b] or self.gpu.lookup(key) is not None:
            return  # already cached (same content computed elsewhere): this copy stays private
        self.gpu.register(b, key, index, self.clock())
        c = self.cpu.lookup(key)
        if c is not None and self.gpu_copy[c] < 0:
            self._link(b, c)

    def release(self, block_table: list[int]) -> None:
        """A sequence stops using its blocks; cached ones stay, owned by nobody, until evicted."""
        now = self.clock()
        gpu = self.gpu
        for b in block_table:
            gpu.users[b] -= 1
            gpu.last_use[b] = now
            if self.cpu_copy[b] >= 0:
                self.cpu.last_use[self.cpu_copy[b]] = now
            if gpu.users[b] == 0 and not gpu.has_content[b]:
                self._free_gpu(b)
        block_table.clear()
        self._forget_rankings()

    # ------------------------------------------------------- conversations
    def record_conversation(self, conversation_id: str, keys: list[BlockKey], tokens: list[int] | None = None) -> None:
        self.conversations.record(conversation_id, keys, self.clock(), tokens)

    def touch_conversation(self, conversation_id: str) -> None:
        self.conversations.touch(conversation_id, self.clock())

    def delete_conversation(self, conversation_id: str) -> bool:
        """Free what only this conversation owned, in both tiers (blocks in use stay until released)."""
        orphans = self.conversations.remove(conversation_id)
        if orphans is None:
            return False
        for key in orphans:
            self._forget(key)
        return True

    def clear(self) -> None:
        """Forget every conversation and every cached block in both tiers. Only between steps, with nothing
        running and no copy in flight (check_integrity holds after)."""
        if self._pinned_gpu or self._pinned_cpu or self._outbound or self._out_gpu or self.num_used_gpu:
            raise CacheIntegrityError("clear() needs an idle cache: blocks are in use or in flight")
        self.conversations = ConversationOwners()
        self._forget_rankings()
        for b in self.gpu.idle():
            self._free_gpu(int(b))
        for c in self.cpu.idle():
            self._drop_cpu(int(c), deleted=True)

    def expire_conversations(self, ttl: float) -> list[str]:
        expired = self.conversations.idle_since(self.clock() - ttl)
        for cid in expired:
            self.delete_conversation(cid)
        return expired

    # ------------------------------------------------------ per-step transfers
    def plan_swap_out(self) -> None:
        """Ahead-of-time swap-out: when few GPU blocks are free, copy the coldest cached
        blocks to the CPU now, so that evicting them later costs nothing."""
        if not (self.tiered and self.cfg.ahead_of_time_swap_out):
            return
        gpu = self.gpu
        target = int(self.cfg.swap_out_watermark * gpu.num_blocks)
        idle = gpu.idle()
        backed = self.cpu_copy[idle] >= 0
        deficit = target - gpu.num_free - int(backed.sum())
        if deficit <= 0:
            return
        cand = idle[~backed]
        if len(cand) == 0:
            return
        k = min(deficit, self.cfg.max_swap_out_blocks_per_step, len(cand))
        scores = self.policy.scores(gpu.last_use[cand], gpu.position[cand], self.clock())
        order = lowest(scores, k)
        # The most valuable of the chosen get CPU blocks first, in case the CPU tier runs short.
        # Only free CPU blocks: a copy made ahead of time duplicates a block the GPU still holds,
        # and dropping CPU-only content for it loses data now to save a copy that may never be
        # needed. With the CPU tier full, eviction copies instead and drops the least valuable
        # then (dropping for ahead-of-time copies recomputed ~10% more tokens than copying at
        # eviction on the H100: benchmarks/results/HISTORY.md, ablations with an 8 GB CPU tier).
        chosen, cpu_blocks = [], []
        for j in order[::-1]:
            if not self.cpu.free:
                break
            chosen.append(int(cand[j]))
            cpu_blocks.append(self.cpu.take_free())
        # paired in ascending order on both sides, a conversation's blocks stay runs of consecutive
        # ids in both tiers, and its swap-in later is a few DMA copies per layer
        for b, c in zip(sorted(chosen), sorted(cpu_blocks)):
            self._store_on_cpu(b, c, self._out_cpu)
            gpu.users[b] += 1                 # the source must not be reused while the copy runs
            self._out_gpu.append(b)
            self.plan.swap_out.append((b, c))
            self.counters.swapped_out_blocks += 1

    def take_plan(self) -> TransferPlan:
        plan, self.plan = self.plan, TransferPlan()
        self._forget_rankings()     # a ranking serves one step's scheduling
        return plan

    def end_step(self) -> None:
        """The step's forward has finished, and with it the swap-ins and eviction copies it waited
        for: drop their pins. This step's ahead-of-time swap-outs may still be running."""
        self._unpin(self._pinned_gpu, self._pinned_cpu)
        self._pinned_gpu, self._pinned_cpu = [], []
        if self._out_gpu:
            self._outbound.append((self._out_gpu, self._out_cpu))
            self._out_gpu, self._out_cpu = [], []

    @property
    def num_swap_out_groups(self) -> int:
        """Steps whose ahead-of-time swap-outs have not been reported done."""
        return len(self._outbound)

    def swap_outs_done(self, num_groups: int) -> None:
        """The oldest `num_groups` steps' swap-outs have landed on the CPU: unpin their blocks."""
        for _ in range(num_groups):
            gpu, cpu = self._outbound.popleft()
            self._unpin(gpu, cpu)

    def _unpin(self, gpu: list[int], cpu: list[int]) -> None:
        self._forget_rankings()
        for b in gpu:
            self.gpu.users[b] -= 1
        for c in cpu:
            self.cpu.users[c] -= 1

    # ------------------------------------------------------------- persistence
    def cached_blocks(self) -> list[tuple[BlockKey, str, int, int, float]]:
        """(key, tier, block, index in its sequence, last use) of every block with content; a key in
        both tiers is listed once, from the CPU."""
        out = []
        for key, c in self.cpu.index.items():
            b = self.gpu_copy[c]
            last = max(self.cpu.last_use[c], self.gpu.last_use[b]) if b >= 0 else self.cpu.last_use[c]
            out.append((key, "cpu", c, int(self.cpu.position[c]), float(last)))
        for key, b in self.gpu.index.items():
            if key not in self.cpu.index:
                out.append((key, "gpu", b, int(self.gpu.position[b]), float(self.gpu.last_use[b])))
        return out

    def tier_keys(self) -> tuple[list[BlockKey], list[BlockKey]]:
        """The content keys each tier holds (GPU, CPU): what a KV event publisher announces."""
        return list(self.gpu.index), list(self.cpu.index)

    def num_free(self, tier: str) -> int:
        return self.cpu.num_free if tier == "cpu" else self.gpu.num_free

    def adopt_block(self, tier: str, key: BlockKey, index: int, last: float) -> int | None:
        """Take a free block of `tier` for saved content; None if the key is cached or no block is free
        (loading never evicts)."""
        if not self.reuse or self.gpu.lookup(key) is not None or self.cpu.lookup(key) is not None:
            return None
        target = self.cpu if tier == "cpu" else self.gpu
        if not target.free:
            return None
        block = target.take_free()
        target.register(block, key, index, last)
        self._forget_rankings()
        return block

    # ------------------------------------------------------------- internals
    def _link(self, b: int, c: int) -> None:
        self.cpu_copy[b] = c
        self.gpu_copy[c] = b

    def _store_on_cpu(self, b: int, c: int, pins: list[int]) -> None:
        key = self.gpu.keys[b]
        if key is None:
            raise CacheIntegrityError(f"GPU block {b} has no content to copy to the CPU")
        self.cpu.register(c, key, self.gpu.position[b], self.gpu.last_use[b])
        self.cpu.users[c] += 1
        pins.append(c)
        self._link(b, c)

    def _allocate_gpu(self, n: int) -> list[int] | None:
        if n > self.num_allocatable():
            return None
        short = n - self.gpu.num_free
        if short > 0:
            self._evict_gpu(short)
        blocks = [self.gpu.take_free() for _ in range(n)]
        # callers pop from the end: descending here gives ascending block tables, whose cached
        # blocks later move between tiers as runs of consecutive blocks (one DMA copy each)
        blocks.sort(reverse=True)
        self.gpu.users[blocks] = 1
        return blocks

    def _evict_gpu(self, k: int, cand: np.ndarray | None = None) -> None:
        """Give up the `k` least valuable of the idle GPU blocks `cand` (default: all of them, ranked
        once for the whole step: see _Ranking)."""
        if cand is None:
            victims = self._least_valuable_gpu(k)
        else:
            scores = self.policy.scores(self.gpu.last_use[cand], self.gpu.position[cand], self.clock())
            victims = [(int(cand[j]), float(scores[j])) for j in lowest(scores, k)]
        for b, score in victims:
            if self.tiered and self.cpu_copy[b] < 0:
                # Not copied ahead of time: copy now, and make the forward wait for it.
                c = self._allocate_cpu(score)
                if c is not None:
                    self._store_on_cpu(b, c, self._pinned_cpu)
                    self.plan.evict_out.append((b, c))
                    self.counters.swapped_out_blocks += 1
                else:
                    self.counters.dropped_blocks += 1
            elif self.cpu_copy[b] < 0:
                self.counters.dropped_blocks += 1
            self._free_gpu(b)

    def _least_valuable_gpu(self, k: int) -> list[tuple[int, float]]:
        """The k least valuable idle GPU blocks with their scores, taken from the step's ranking."""
        out: list[tuple[int, float]] = []
        for _ in range(k):
            ranking, top = self._coldest(self.gpu, k - len(out))
            if top is None:
                raise CacheIntegrityError(f"{k} GPU blocks to evict, {len(out)} idle")
            ranking.pop()
            out.append(top)
        return out

    def _allocate_cpu(self, incoming_score: float) -> int | None:
        """A CPU block for a block worth `incoming_score`, dropping a less valuable one if full."""
        if self.cpu.free:
            return self.cpu.take_free()
        ranking, top = self._coldest(self.cpu, 1)
        if top is None or top[1] >= incoming_score:
            return None
        ranking.pop()
        self._drop_cpu(top[0])
        return self.cpu.take_free()

    def _coldest(self, tier: BlockTier, need: int) -> tuple[_Ranking, tuple[int, float] | None]:
        """The tier's step ranking and its least valuable block still idle (None: none is). A ranking
        whose sorted share is used up is made again over what is left."""
        while True:
            ranking = self._rankings.get(tier.name)
            fresh = ranking is None
            if fresh:
                ranking = self._rankings[tier.name] = _Ranking(tier, self.policy, self.clock(), need)
            top = ranking.peek()
            if top is not None or fresh or ranking.complete:
                return ranking, top
            del self._rankings[tier.name]

    def _forget_rankings(self) -> None:
        """Blocks may have become idle (a release, an unpin): the next eviction ranks again."""
        self._rankings.clear()

    def _free_gpu(self, b: int) -> None:
        """A GPU block with no user gives up its content (its CPU copy, if any, stays)."""
        c = self.cpu_copy[b]
        if c >= 0:
            self.gpu_copy[c] = -1
            self.cpu_copy[b] = -1
        self.gpu.release_to_free(b)

    def _drop_cpu(self, c: int, deleted: bool = False) -> None:
        """Free a CPU block; its content counts as dropped unless the GPU still holds it or a
        delete asked for it."""
        b = self.gpu_copy[c]
        if b >= 0:
            self.cpu_copy[b] = -1
            self.gpu_copy[c] = -1
        elif not deleted:
            self.counters.dropped_blocks += 1
        self.cpu.release_to_free(c)

    def _forget(self, key: BlockKey) -> None:
        """Delete a key's content from both tiers, except where a running sequence or a copy in flight holds it."""
        b = self.gpu.lookup(key)
        if b is not None and self.gpu.users[b] == 0:
            self._free_gpu(b)
        c = self.cpu.lookup(key)
        if c is not None and self.cpu.users[c] == 0:
            self._drop_cpu(c, deleted=True)

    # ----------------------------------------------------------- invariants
    def check_integrity(self) -> None:
        """Both tiers consistent (free + cached + used == total), every link points back, no pin
        outlived its step; raises CacheIntegrityError. Vectorised: it runs on every idle spell."""
        self.gpu.check()
        self.cpu.check()
        cpu_free = np.zeros(self.cpu.num_blocks, bool)
        cpu_free[self.cpu.free] = True
        if (~cpu_free & ~self.cpu.has_content).any():
            raise CacheIntegrityError("a CPU block is allocated without content")
        for b in np.flatnonzero(self.cpu_copy >= 0):
            c = self.cpu_copy[b]
            if self.gpu_copy[c] != b or self.cpu.keys[c] != self.gpu.keys[b]:
                raise CacheIntegrityError(f"bad link GPU {b} -> CPU {c}")
        if self._pinned_gpu or self._pinned_cpu:
            raise CacheIntegrityError("pins outlived their step")
        if self._outbound or self._out_gpu:
            raise CacheIntegrityError("swap-outs still in flight: flush them first")


class _Ranking:
    """One tier's idle blocks, least valuable first, scored once and shared by every eviction of one
    step's scheduling (a pool kept full of idle cache evicts a few blocks for nearly every sequence that
    grows, and ranking thousands of blocks for each took most of the scheduler's host time:
    benchmarks/results/host-step-cpu/).

    Exact while blocks only leave the idle set: `peek` skips blocks that were taken (evicted, hit,
    pinned) since the ranking, and the manager drops the ranking whenever a block may have become idle
    (a release, an unpin, the step's end). With `now` fixed within the step, taking blocks in this order
    evicts exactly what a fresh argmin before each eviction would (tests/cache/test_manager.py checks
    both tiers against that reference). Only the `depth` lowest are sorted; the manager ranks again
    when they are used up.
    """

    DEPTH = 512   # sorted per ranking: a step seldom evicts more, and a partial sort keeps it O(n)

    def __init__(self, tier: BlockTier, policy: EvictionPolicy, now: float, need: int) -> None:
        blocks = tier.idle()
        scores = policy.scores(tier.last_use[blocks], tier.position[blocks], now)
        depth = max(need, self.DEPTH)
        order = lowest(scores, depth)                  # ties: the lowest block id first, as argmin
        self._tier = tier
        self._blocks = blocks[order].tolist()
        self._scores = scores[order].tolist()
        self.complete = depth >= len(blocks)           # every idle block is ranked
        self._next = 0

    def peek(self) -> tuple[int, float] | None:
        """The least valuable ranked block still idle, with its score; None once they are used up."""
        tier = self._tier
        while self._next < len(self._blocks):
            b = self._blocks[self._next]
            if tier.has_content[b] and tier.users[b] == 0:
                return b, self._scores[self._next]
            self._next += 1
        return None

    def pop(self) -> None:
        self._next += 1
