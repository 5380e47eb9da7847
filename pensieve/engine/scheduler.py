"""Iteration-level scheduling: each step is one ragged batch of decode tokens and prefill chunks.

The scheduler knows no phases: every sequence has pending positions (a new
prompt, a prompt chunk left over, a dropped prefix to recompute, the one
token of a decode) and each step takes some of them under a token budget.
Running sequences go first; waiting ones are admitted while the budget,
the sequence cap and the free blocks allow. When blocks run out, the most
recently arrived running sequence is preempted: its full blocks stay in the
cache, so taking it up again mostly reuses them.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from pensieve.cache.block_keys import extend_block_keys
from pensieve.cache.manager import KVCacheManager, TransferPlan
from pensieve.config import CacheConfig, SchedulerConfig
from pensieve.engine.outputs import CacheUsage
from pensieve.engine.sequence import SeqStatus, Sequence


@dataclass(frozen=True)
class ScheduledChunk:
    seq: Sequence
    ranges: tuple[tuple[int, int], ...]   # positions whose KV this step computes, ascending
    sample: bool                          # the chunk reaches the last token: sample the next one

    @property
    def num_tokens(self) -> int:
        return sum(hi - lo for lo, hi in self.ranges)


@dataclass(frozen=True)
class StepPlan:
    chunks: tuple[ScheduledChunk, ...]
    transfers: TransferPlan
    preempted: tuple[Sequence, ...]
    # a chunk of this step reads blocks swapped in by this step: its forward waits layer by layer.
    # Otherwise the swap-ins are for the next step and overlap this whole step.
    swap_in_now: bool = False

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)


class Scheduler:
    def __init__(self, cfg: SchedulerConfig, cache_cfg: CacheConfig, kv: KVCacheManager) -> None:
        self.cfg = cfg
        self.kv = kv
        self.block_size = cache_cfg.block_size
        self.admit_reserve = int(cache_cfg.admit_watermark * kv.num_gpu_blocks)
        self.defer_swap_in = cache_cfg.defer_swap_in
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def remove(self, request_id: str) -> Sequence | None:
        """Take a request out wherever it is and free its blocks at once."""
        for seq in self.running:
            if seq.request_id == request_id:
                self.running.remove(seq)
                self.kv.release(seq.block_table)
                seq.status = SeqStatus.FINISHED
                return seq
        for seq in self.waiting:
            if seq.request_id == request_id:
                self.waiting.remove(seq)
                seq.status = SeqStatus.FINISHED
                return seq
        return None

    def finish(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.kv.release(seq.block_table)
        seq.status = SeqStatus.FINISHED

    def schedule(self) -> StepPlan:
        budget = self.cfg.max_num_batched_tokens
        chunks: list[ScheduledChunk] = []
        preempted: list[Sequence] = []
        swap_in_now = False
        for seq in list(self.running):
            if seq.status is not SeqStatus.RUNNING or budget == 0:
                continue
            n = min(seq.num_pending, budget)
            if n == 0:
                continue
            while not self.kv.grow(seq.block_table, seq.num_tokens):
                victim = self.running[-1]
                self._preempt(victim)
                preempted.append(victim)
                if victim is seq:
                    break
            if seq.status is not SeqStatus.RUNNING:
                continue
            chunks.append(self._chunk(seq, n))
            budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.cfg.max_num_seqs and not preempted:
            seq = self.waiting[0]
            extend_block_keys(seq.block_keys, seq.token_ids, self.block_size, seq.key_root)
            reserve = self.admit_reserve if self.running else 0
            adm = self.kv.admit(seq.block_keys, seq.num_tokens, reserve, seq.conversation_id)
            if adm is None:
                break
            self.waiting.popleft()
            seq.block_table, seq.pending = adm.block_table, adm.pending
            if seq.num_preemptions == 0:  # a resumed request reports its first admission's hits
                seq.cache = CacheUsage(adm.gpu_hit_tokens, adm.cpu_hit_tokens, adm.recomputed_tokens)
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            if adm.cpu_hit_tokens and chunks and self.defer_swap_in:
                # Other work runs this step: bring this sequence's blocks in behind it and compute
                # it next step, so this step keeps its CUDA graph instead of an eager forward
                # that waits on the copy layer by layer.
                continue
            swap_in_now = swap_in_now or adm.cpu_hit_tokens > 0
            n = min(seq.num_pending, budget)
            chunks.append(self._chunk(seq, n))
            budget -= n
        self.kv.plan_swap_out()
        return StepPlan(tuple(chunks), self.kv.take_plan(), tuple(preempted), swap_in_now)

    def can_admit_next(self, taken_first: int = 0) -> bool:
        """Whether schedule() would admit the first waiting sequence now, after the running ones take
        `taken_first` more blocks to grow. Changes nothing but that sequence's block keys (cached)."""
        if not self.waiting or len(self.running) >= self.cfg.max_num_seqs:
            return False
        seq = self.waiting[0]
        extend_block_keys(seq.block_keys, seq.token_ids, self.block_size, seq.key_root)
        reserve = self.admit_reserve if self.running else 0
        return self.kv.fits(seq.block_keys, seq.num_tokens, reserve, taken_first)

    def schedule_decode(self, seqs: list[Sequence]) -> StepPlan:
        """An overlapped decode step: one token for each of `seqs`, running sequences whose last
        token the GPU is still sampling (it enters as a placeholder). The caller checked that the
        free GPU blocks cover their growth, so no block is evicted and no copy is planned; nobody
        is admitted (the caller takes this path only when nobody waiting could be: can_admit_next)."""
        chunks = []
        for seq in seqs:
            seq.append_placeholder()
            if not self.kv.grow(seq.block_table, seq.num_tokens):
                raise RuntimeError("schedule_decode needs free blocks for every growth")
            chunks.append(self._chunk(seq, 1))
        return StepPlan(tuple(chunks), self.kv.take_plan(), ())

    def _chunk(self, seq: Sequence, n: int) -> ScheduledChunk:
        ranges = tuple(seq.take_pending(n))
        return ScheduledChunk(seq, ranges, sample=not seq.pending and ranges[-1][1] == seq.num_tokens)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.kv.release(seq.block_table)
        seq.pending = []
        seq.status = SeqStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def commit_computed(self, chunk: ScheduledChunk) -> None:
        """Offer every block this chunk completed to the cache (prompt and generated tokens alike)."""
        seq, bs = chunk.seq, self.block_size
        extend_block_keys(seq.block_keys, seq.token_ids, bs, seq.key_root)
        for lo, hi in chunk.ranges:
            for i in range(lo // bs, hi // bs):
                self.kv.commit_block(seq.block_table, i, seq.block_keys[i])
