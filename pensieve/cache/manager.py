"""The conversation KV manager: where each block's KV lives (GPU, CPU, nowhere) and what moves each step.

Plain Python and numpy over block ids; the tensors themselves live in
`kv_pool.KVPools` and are moved by `transfer.KVTransfer`.

GPU block states: free (no content), cached (content, no user: evictable),
used (referenced by running sequences). CPU block states: free, cached,
pinned (the source or target of a copy in flight this step). A content key
(`block_keys`) may be registered in both tiers at once: a GPU block copied
to the CPU ahead of time keeps a link to its copy, so evicting it from the
GPU is just freeing.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from pensieve.cache.block_keys import BlockKey
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
        self.num_gpu_blocks = num_gpu_blocks
        self.num_cpu_blocks = num_cpu_blocks if self.tiered else 0
        # GPU tier
        self.g_ref = np.zeros(num_gpu_blocks, np.int32)
        self.g_key: list[BlockKey | None] = [None] * num_gpu_blocks
        self.g_last = np.zeros(num_gpu_blocks)
        self.g_pos = np.zeros(num_gpu_blocks)            # block index within its sequence
        self.g_cpu = np.full(num_gpu_blocks, -1, np.int64)  # linked CPU copy
        self.g_evictable = np.zeros(num_gpu_blocks, bool)
        self.g_free: list[int] = list(range(num_gpu_blocks - 1, -1, -1))
        self.g_index: dict[BlockKey, int] = {}
        # CPU tier
        nc = self.num_cpu_blocks
        self.c_pin = np.zeros(nc, np.int32)
        self.c_key: list[BlockKey | None] = [None] * nc
        self.c_last = np.zeros(nc)
        self.c_pos = np.zeros(nc)
        self.c_gpu = np.full(nc, -1, np.int64)
        self.c_cached = np.zeros(nc, bool)
        self.c_free: list[int] = list(range(nc - 1, -1, -1))
        self.c_index: dict[BlockKey, int] = {}
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

    # ------------------------------------------------------------------ queries
    @property
    def num_free_gpu(self) -> int:
        return len(self.g_free)

    @property
    def num_cached_gpu(self) -> int:
        return int(self.g_evictable.sum())

    @property
    def num_used_gpu(self) -> int:
        return self.num_gpu_blocks - self.num_free_gpu - self.num_cached_gpu

    @property
    def num_used_cpu(self) -> int:
        return self.num_cpu_blocks - len(self.c_free)

    def num_allocatable(self) -> int:
        return len(self.g_free) + self.num_cached_gpu

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
        num_blocks = self.blocks_needed(num_tokens)
        reusable = (num_tokens - 1) // bs if self.reuse else 0
        gpu_hits: dict[int, int] = {}
        cpu_hits: dict[int, int] = {}
        for i in range(reusable):
            key = keys[i]
            if key in self.g_index:
                gpu_hits[i] = self.g_index[key]
            elif self.tiered and key in self.c_index:
                cpu_hits[i] = self.c_index[key]
        need = num_blocks - len(gpu_hits)
        hits_evictable = sum(1 for b in gpu_hits.values() if self.g_evictable[b])
        if need > self.num_allocatable() - hits_evictable - reserve:
            return None
        now = self.clock()
        for b in gpu_hits.values():
            self._ref(b)
        for c in cpu_hits.values():  # pinned before allocating, so eviction cannot drop them
            self.c_pin[c] += 1
            self._pinned_cpu.append(c)
        fresh = self._allocate_gpu(need)
        assert fresh is not None
        table: list[int] = []
        for i in range(num_blocks):
            if i in gpu_hits:
                table.append(gpu_hits[i])
                continue
            b = fresh.pop()
            table.append(b)
            if i in cpu_hits:
                c = cpu_hits[i]
                self._register_gpu(b, keys[i], i)
                self._link(b, c)
                self.c_last[c] = now
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

    def commit_block(self, block_table: list[int], index: int, key: BlockKey) -> None:
        """Make a freshly computed full block findable by its content key."""
        if not self.reuse:
            return
        b = block_table[index]
        if self.g_key[b] is not None or key in self.g_index:
            return  # already cached (same content computed elsewhere): this copy stays private
        self._register_gpu(b, key, index)
        c = self.c_index.get(key, -1)
        if c >= 0 and self.c_gpu[c] < 0:
            self._link(b, c)

    def release(self, block_table: list[int]) -> None:
        """A sequence stops using its blocks; cached ones stay, owned by nobody, until evicted."""
        now = self.clock()
        for b in block_table:
            self.g_ref[b] -= 1
            self.g_last[b] = now
            if self.g_cpu[b] >= 0:
                self.c_last[self.g_cpu[b]] = now
            if self.g_ref[b] == 0:
                if self.g_key[b] is not None and self.reuse:
                    self.g_evictable[b] = True
                else:
                    self._free_gpu(b)
        block_table.clear()

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
        target = int(self.cfg.swap_out_watermark * self.num_gpu_blocks)
        backed = int((self.g_evictable & (self.g_cpu >= 0)).sum())
        deficit = target - len(self.g_free) - backed
        if deficit <= 0:
            return
        cand = np.flatnonzero(self.g_evictable & (self.g_cpu < 0))
        if len(cand) == 0:
            return
        k = min(deficit, self.cfg.max_swap_out_blocks_per_step, len(cand))
        now = self.clock()
        scores = self.policy.scores(self.g_last[cand], self.g_pos[cand], now)
        order = lowest(scores, k)
        # The most valuable of the chosen get CPU blocks first, in case the CPU tier runs short.
        # Only free CPU blocks: a copy made ahead of time duplicates a block the GPU still holds,
        # and dropping CPU-only content for it loses data now to save a copy that may never be
        # needed. With the CPU tier full, eviction copies instead and drops the least valuable
        # then (on the H100 with an 8 GB CPU tier, dropping for ahead-of-time copies recomputed
        # ~10% more tokens than copying at eviction: docs/BENCHMARKS.md, stop 10 ablations).
        chosen, cpu_blocks = [], []
        for j in order[::-1]:
            if not self.c_free:
                break
            chosen.append(int(cand[j]))
            cpu_blocks.append(self.c_free.pop())
        # paired in ascending order on both sides, a conversation's blocks stay runs of consecutive
        # ids in both tiers, and its swap-in later is a few DMA copies per layer
        for b, c in zip(sorted(chosen), sorted(cpu_blocks)):
            self._store_on_cpu(b, c, self._out_cpu)
            self._ref(b)                      # the source must not be reused while the copy runs
            self._out_gpu.append(b)
            self.plan.swap_out.append((b, c))
            self.counters.swapped_out_blocks += 1

    def take_plan(self) -> TransferPlan:
        plan, self.plan = self.plan, TransferPlan()
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
        for b in gpu:
            self.g_ref[b] -= 1
            if self.g_ref[b] == 0:
                self.g_evictable[b] = True
        for c in cpu:
            self.c_pin[c] -= 1

    # ------------------------------------------------------------- persistence
    def cached_blocks(self) -> list[tuple[BlockKey, str, int, int, float]]:
        """(key, tier, block, index in its sequence, last use) of every block with content; a key in
        both tiers is listed once, from the CPU."""
        out = []
        for key, c in self.c_index.items():
            b = self.c_gpu[c]
            last = max(self.c_last[c], self.g_last[b]) if b >= 0 else self.c_last[c]
            out.append((key, "cpu", c, int(self.c_pos[c]), float(last)))
        for key, b in self.g_index.items():
            if key not in self.c_index:
                out.append((key, "gpu", b, int(self.g_pos[b]), float(self.g_last[b])))
        return out

    def tier_keys(self) -> tuple[list[BlockKey], list[BlockKey]]:
        """The content keys each tier holds (GPU, CPU): what a KV event publisher announces."""
        return list(self.g_index), list(self.c_index)

    def num_free(self, tier: str) -> int:
        return len(self.c_free) if tier == "cpu" else len(self.g_free)

    def adopt_block(self, tier: str, key: BlockKey, index: int, last: float) -> int | None:
        """Take a free block of `tier` for saved content; None if the key is cached or no block is free
        (loading never evicts)."""
        if key in self.g_index or key in self.c_index or not self.reuse:
            return None
        if tier == "cpu":
            if not self.c_free:
                return None
            c = self.c_free.pop()
            self.c_key[c], self.c_pos[c], self.c_last[c], self.c_cached[c] = key, index, last, True
            self.c_index[key] = c
            return c
        if not self.g_free:
            return None
        b = self.g_free.pop()
        self._register_gpu(b, key, index)
        self.g_last[b] = last
        self.g_evictable[b] = True
        return b

    # ------------------------------------------------------------- internals
    def _ref(self, b: int) -> None:
        if self.g_ref[b] == 0:
            self.g_evictable[b] = False
        self.g_ref[b] += 1

    def _register_gpu(self, b: int, key: BlockKey, index: int) -> None:
        self.g_key[b] = key
        self.g_index[key] = b
        self.g_pos[b] = index
        self.g_last[b] = self.clock()

    def _unregister_gpu(self, b: int) -> None:
        key = self.g_key[b]
        if key is not None:
            if self.g_index.get(key) == b:
                del self.g_index[key]
            self.g_key[b] = None
        c = self.g_cpu[b]
        if c >= 0:
            self.c_gpu[c] = -1
            self.g_cpu[b] = -1

    def _link(self, b: int, c: int) -> None:
        self.g_cpu[b] = c
        self.c_gpu[c] = b

    def _store_on_cpu(self, b: int, c: int, pins: list[int]) -> None:
        key = self.g_key[b]
        assert key is not None
        self.c_key[c] = key
        self.c_index[key] = c
        self.c_pos[c] = self.g_pos[b]
        self.c_last[c] = self.g_last[b]
        self.c_cached[c] = True
        self.c_pin[c] += 1
        pins.append(c)
        self._link(b, c)

    def _allocate_gpu(self, n: int) -> list[int] | None:
        if n > self.num_allocatable():
            return None
        short = n - len(self.g_free)
        if short > 0:
            self._evict_gpu(short)
        blocks = [self.g_free.pop() for _ in range(n)]
        # callers pop from the end: descending here gives ascending block tables, whose cached
        # blocks later move between tiers as runs of consecutive blocks (one DMA copy each)
        blocks.sort(reverse=True)
        self.g_ref[blocks] = 1
        return blocks

    def _evict_gpu(self, k: int) -> None:
        cand = np.flatnonzero(self.g_evictable)
        now = self.clock()
        scores = self.policy.scores(self.g_last[cand], self.g_pos[cand], now)
        for j in lowest(scores, k):
            b = int(cand[j])
            if self.tiered and self.g_cpu[b] < 0:
                # Not copied ahead of time: copy now, and make the forward wait for it.
                c = self._allocate_cpu(float(scores[j]), now)
                if c is not None:
                    self._store_on_cpu(b, c, self._pinned_cpu)
                    self.plan.evict_out.append((b, c))
                    self.counters.swapped_out_blocks += 1
                else:
                    self.counters.dropped_blocks += 1
            elif self.g_cpu[b] < 0:
                self.counters.dropped_blocks += 1
            self._free_gpu(b)

    def _free_gpu(self, b: int) -> None:
        """A cached GPU block with no user gives up its content (its CPU copy, if any, stays)."""
        self.g_evictable[b] = False
        self._unregister_gpu(b)
        self.g_free.append(b)

    def _allocate_cpu(self, incoming_score: float, now: float) -> int | None:
        """A CPU block for a block worth `incoming_score`, dropping a less valuable one if full."""
        if self.c_free:
            return self.c_free.pop()
        cand = np.flatnonzero(self.c_cached & (self.c_pin == 0))
        if len(cand) == 0:
            return None
        scores = self.policy.scores(self.c_last[cand], self.c_pos[cand], now)
        j = int(np.argmin(scores))
        if scores[j] >= incoming_score:
            return None
        c = int(cand[j])
        self._drop_cpu(c)
        return self.c_free.pop()

    def _drop_cpu(self, c: int, deleted: bool = False) -> None:
        """Free a CPU block; its content counts as dropped unless the GPU still holds it or a
        delete asked for it."""
        key = self.c_key[c]
        if key is not None and self.c_index.get(key) == c:
            del self.c_index[key]
        self.c_key[c] = None
        self.c_cached[c] = False
        b = self.c_gpu[c]
        if b >= 0:
            self.g_cpu[b] = -1
            self.c_gpu[c] = -1
        elif not deleted:
            self.counters.dropped_blocks += 1
        self.c_free.append(c)

    def _forget(self, key: BlockKey) -> None:
        """Delete a key's content from both tiers, except where a running sequence or a copy in flight holds it."""
        b = self.g_index.get(key)
        if b is not None and self.g_ref[b] == 0:
            self._free_gpu(b)
        c = self.c_index.get(key)
        if c is not None and self.c_pin[c] == 0:
            self._drop_cpu(c, deleted=True)

    # ----------------------------------------------------------- invariants
    def check_integrity(self) -> None:
        """free + cached + used == total in both tiers, and every index entry points back.

        Vectorised where it can be: it runs on every idle spell of the server."""
        free = np.zeros(self.num_gpu_blocks, bool)
        free[self.g_free] = True
        assert free.sum() == len(self.g_free), "GPU block freed twice"
        used = self.g_ref > 0
        states = free.astype(int) + self.g_evictable + used
        bad = np.flatnonzero(states != 1)
        assert len(bad) == 0, f"GPU blocks {bad[:8].tolist()} are in {states[bad[:8]].tolist()} states"
        assert (self.g_ref >= 0).all(), "negative reference count"
        has_key = np.array([k is not None for k in self.g_key], bool)
        assert not (free & (has_key | (self.g_cpu >= 0))).any(), "a free GPU block holds content"
        assert has_key[self.g_evictable].all(), "a cached GPU block has no key"
        for b in np.flatnonzero(self.g_cpu >= 0):
            c = self.g_cpu[b]
            assert self.c_gpu[c] == b and self.c_key[c] == self.g_key[b], f"bad link {b}->{c}"
        for key, b in self.g_index.items():
            assert self.g_key[b] == key
        cfree = np.zeros(self.num_cpu_blocks, bool)
        cfree[self.c_free] = True
        assert cfree.sum() == len(self.c_free), "CPU block freed twice"
        assert (cfree ^ self.c_cached).all(), "a CPU block is both free and cached, or neither"
        assert not (cfree & (self.c_pin > 0)).any(), "a free CPU block is pinned"
        assert all(self.c_key[c] is None for c in self.c_free), "a free CPU block holds content"
        for key, c in self.c_index.items():
            assert self.c_key[c] == key
        assert not self._pinned_gpu and not self._pinned_cpu, "pins outlived their step"
        assert not self._outbound and not self._out_gpu, "swap-outs still in flight: flush them first"
