"""Per-step attention metadata: built once per step by the model runner, read by every layer."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class AttentionMetadata:
    """The flattened ragged batch of one forward step.

    T new tokens of B sequences are concatenated; sequence b owns rows
    query_start_loc[b]:query_start_loc[b+1]. Every new token carries its own
    position: a query at position p attends to the sequence's KV positions
    j <= p, where KV position j lives in block block_tables[b, j // block_size]
    at offset j % block_size. New tokens need not be contiguous in position
    (a dropped prefix recomputed together with a new turn, the cached middle
    between them), so the mask follows positions, never batch order.
    """

    positions: torch.Tensor          # [T] int64
    query_start_loc: torch.Tensor    # [B+1] int32
    seq_lens: torch.Tensor           # [B] int32: KV positions of each sequence after this step (last position + 1)
    block_tables: torch.Tensor       # [B, max_blocks_per_seq] int32, padded with 0
    slot_mapping: torch.Tensor       # [T] int64: block_id * block_size + offset of each new token's KV
    block_size: int
    max_query_len: int
    max_seq_len: int
    decode_only: bool                # every sequence has exactly one new token (query_start_loc = 0, 1, 2, ...)
    # Every sequence's new tokens are its last positions, seq_len - q_len .. seq_len - 1 (no recomputed
    # prefix split from a new turn): attention may then read them from the layer's own K/V.
    new_tokens_are_suffix: bool = False
    # Some sequence has KV positions before its new tokens (cached context). False lets a prefill of
    # suffixes skip the paged-cache loops of attention altogether.
    has_context: bool = True
    # Called before layer l reads the cache: waits (on the device, via an event)
    # until layer l's swapped-in blocks have arrived. None when nothing is swapped in.
    wait_for_layer: Callable[[int], None] | None = None

    @property
    def num_seqs(self) -> int:
        return self.seq_lens.shape[0]
