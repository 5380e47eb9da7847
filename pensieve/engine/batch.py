"""One step's flattened ragged batch, built on the host from the scheduler's plan.

Plain numpy, no device: the runner uploads it (`to_metadata`), and under tensor parallelism rank 0
builds it once and every rank runs the same batch. Layout (see kernels/metadata.py): the new tokens of
all scheduled chunks concatenated; sequence b owns rows query_start_loc[b]:query_start_loc[b+1].

A step may also be laid out as one-token rows: every new token becomes its own query row (same block
table, seq_len = its position + 1). Any token can be computed that way, because its KV is stored before
attention reads the cache, and it lets a small mixed step replay a decode CUDA graph.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence as Seq
from dataclasses import dataclass

import numpy as np
import torch

from pensieve.engine.scheduler import ScheduledChunk
from pensieve.kernels.metadata import AttentionMetadata


@dataclass(frozen=True)
class StepBatch:
    input_ids: np.ndarray        # [T] int64; -1 where the ids are a placeholder sampled on the device
    positions: np.ndarray        # [T] int64
    query_start_loc: np.ndarray  # [B+1] int32
    seq_lens: np.ndarray         # [B] int32: KV positions of each row's sequence after this step
    block_tables: np.ndarray     # [B, W] int32, padded with 0
    slot_mapping: np.ndarray     # [T] int64: block * block_size + offset of each new token's KV
    logits_rows: np.ndarray      # [S] int64: rows whose hidden state is sampled, in chunk order
    as_rows: bool                # laid out as one-token rows

    @property
    def num_tokens(self) -> int:
        return int(self.positions.shape[0])

    @property
    def num_seqs(self) -> int:
        return int(self.seq_lens.shape[0])

    @property
    def max_query_len(self) -> int:
        return int(np.diff(self.query_start_loc).max())

    @property
    def decode_only(self) -> bool:
        return self.max_query_len == 1

    @property
    def new_tokens_are_suffix(self) -> bool:
        """Every sequence's new tokens are its last positions (one range per chunk ending at its
        seq_len), so attention may read their K/V from the layer's own tensors."""
        if self.as_rows:
            return False
        first = self.positions[self.query_start_loc[:-1]]   # each row's positions ascend and end at seq_len - 1
        return bool((first == self.seq_lens - np.diff(self.query_start_loc)).all())

    @property
    def has_context(self) -> bool:
        """Some sequence has KV before its new tokens (cached context): False lets a batch of whole
        prompts skip the paged-cache loops of attention."""
        return bool((self.seq_lens > np.diff(self.query_start_loc)).any())


def build_batch(chunks: Seq[ScheduledChunk], block_size: int, as_rows: bool) -> StepBatch:
    """The step's batch from its scheduled chunks (plain lists: a decode step is one token per
    sequence, and list appends beat numpy at that size)."""
    ids: list[int] = []
    pos: list[int] = []
    slots: list[int] = []
    qsl, seq_lens, tables, logits_rows = [0], [], [], []
    for chunk in chunks:
        seq = chunk.seq
        table, tokens = seq.block_table, seq.token_ids
        for lo, hi in chunk.ranges:
            ids.extend(tokens[lo:hi])
            r = range(lo, hi)
            pos.extend(r)
            slots.extend(table[p // block_size] * block_size + p % block_size for p in r)
            if as_rows:
                seq_lens.extend(p + 1 for p in r)
                tables.extend([table] * (hi - lo))
                qsl.extend(range(qsl[-1] + 1, qsl[-1] + 1 + hi - lo))
        if not as_rows:
            qsl.append(len(pos))
            seq_lens.append(chunk.ranges[-1][1])
            tables.append(table)
        if chunk.sample:
            logits_rows.append(len(pos) - 1)
    return StepBatch(np.array(ids, np.int64), np.array(pos, np.int64), np.array(qsl, np.int32),
                     np.array(seq_lens, np.int32), _pad_tables(tables), np.array(slots, np.int64),
                     np.array(logits_rows, np.int64), as_rows)


def prefill_batch(start: int, end: int, block_size: int) -> StepBatch:
    """One sequence computing positions [start, end) over blocks 0, 1, 2, ... (profiling runs)."""
    positions = np.arange(start, end, dtype=np.int64)
    table = np.arange(-(-end // block_size), dtype=np.int32)[None, :]
    return StepBatch(np.zeros(end - start, np.int64), positions, np.array([0, end - start], np.int32),
                     np.array([end], np.int32), table, positions.copy(), np.array([end - start - 1], np.int64),
                     as_rows=False)


def token_rows_pay_off(chunks: Seq[ScheduledChunk], max_rows: int, reread_budget_tokens: float) -> bool:
    """Run a mixed step as one-token rows through a decode graph (at most `max_rows` rows) when
    small: an eager forward is bound by kernel launches, while rows re-read each new token's context
    (the sum of their positions) from the cache. Small prefill chunks over cached history, the common
    case of a returning conversation, cost little that way."""
    if max_rows <= 0 or reread_budget_tokens <= 0 or not any(c.num_tokens > 1 for c in chunks):
        return False
    if sum(c.num_tokens for c in chunks) > max_rows:
        return False
    reread = 0
    for chunk in chunks:
        if chunk.num_tokens > 1:
            reread += sum((hi * (hi + 1) - lo * (lo + 1)) // 2 for lo, hi in chunk.ranges)
    return reread <= reread_budget_tokens


def to_metadata(batch: StepBatch, block_size: int, upload: Callable[[np.ndarray, torch.dtype], torch.Tensor],
                wait: Callable[[int], None] | None = None) -> AttentionMetadata:
    """The batch's attention metadata on the device; `upload` copies one host array there."""
    return AttentionMetadata(
        positions=upload(batch.positions, torch.int64), query_start_loc=upload(batch.query_start_loc, torch.int32),
        seq_lens=upload(batch.seq_lens, torch.int32), block_tables=upload(batch.block_tables, torch.int32),
        slot_mapping=upload(batch.slot_mapping, torch.int64), block_size=block_size,
        max_query_len=batch.max_query_len, max_seq_len=int(batch.seq_lens.max()), decode_only=batch.decode_only,
        new_tokens_are_suffix=batch.new_tokens_are_suffix, has_context=batch.has_context, wait_for_layer=wait)


def _pad_tables(tables: list[list[int]]) -> np.ndarray:
    width = max(len(t) for t in tables)
    out = np.zeros((len(tables), width), np.int32)
    for i, t in enumerate(tables):
        out[i, :len(t)] = t
    return out
