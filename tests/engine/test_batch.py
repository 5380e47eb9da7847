"""Batch building on its own: a plan's chunks -> the flattened ragged batch (host arrays)."""
from __future__ import annotations

import numpy as np
import torch

from pensieve.distributed.channel import decode_step, encode_step
from pensieve.cache.manager import TransferPlan
from pensieve.engine.batch import build_batch, prefill_batch, to_metadata, token_rows_pay_off
from pensieve.engine.model_runner import StepInput
from pensieve.engine.scheduler import ScheduledChunk
from pensieve.engine.sequence import Sequence
from pensieve.sampling_params import SamplingParams

BS = 4


def chunk(tokens: int, table: list[int], ranges, sample: bool = True) -> ScheduledChunk:
    seq = Sequence("r", list(range(100, 100 + tokens)), tokens, SamplingParams(), 0.0)
    seq.block_table = table
    return ScheduledChunk(seq, tuple(ranges), sample)


def test_a_decode_and_a_prefill_chunk_flatten_into_one_batch():
    decode = chunk(9, [7, 3, 5], [(8, 9)])
    prefill = chunk(6, [2, 4], [(0, 6)])
    b = build_batch([decode, prefill], BS, as_rows=False)
    assert b.positions.tolist() == [8, 0, 1, 2, 3, 4, 5]
    assert b.input_ids.tolist() == [108, 100, 101, 102, 103, 104, 105]
    assert b.query_start_loc.tolist() == [0, 1, 7] and b.seq_lens.tolist() == [9, 6]
    assert b.slot_mapping.tolist() == [5 * 4 + 0, 8, 9, 10, 11, 16, 17]   # block 5 offset 0; blocks 2 and 4
    assert b.block_tables.tolist() == [[7, 3, 5], [2, 4, 0]]                # padded with 0
    assert b.logits_rows.tolist() == [0, 6]
    assert not b.decode_only and b.max_query_len == 6
    assert b.new_tokens_are_suffix and b.has_context                       # the decode has context


def test_a_recomputed_prefix_beside_a_new_turn_is_not_a_suffix():
    """Dropped leading blocks are recomputed in the same chunk as the new turn, the cached middle between."""
    c = chunk(14, [1, 2, 3, 4], [(0, 4), (12, 14)])
    b = build_batch([c], BS, as_rows=False)
    assert b.positions.tolist() == [0, 1, 2, 3, 12, 13] and b.seq_lens.tolist() == [14]
    assert not b.new_tokens_are_suffix


def test_rows_layout_makes_every_token_its_own_query():
    c = chunk(6, [2, 4], [(3, 6)], sample=True)
    b = build_batch([c], BS, as_rows=True)
    assert b.query_start_loc.tolist() == [0, 1, 2, 3] and b.seq_lens.tolist() == [4, 5, 6]
    assert b.block_tables.tolist() == [[2, 4]] * 3 and b.logits_rows.tolist() == [2]
    assert b.decode_only and not b.new_tokens_are_suffix


def test_a_prompt_without_context_skips_the_paged_loops():
    b = build_batch([chunk(6, [2, 4], [(0, 6)])], BS, as_rows=False)
    assert not b.has_context
    p = prefill_batch(8, 16, BS)
    assert p.has_context and p.positions.tolist() == list(range(8, 16)) and p.block_tables.tolist() == [[0, 1, 2, 3]]


def test_rows_pay_off_only_for_small_rereads_within_the_graphs():
    small = [chunk(40, list(range(10)), [(36, 40)])]
    assert token_rows_pay_off(small, max_rows=8, reread_budget_tokens=1000)
    assert not token_rows_pay_off(small, max_rows=0, reread_budget_tokens=1000)      # no graphs captured
    assert not token_rows_pay_off(small, max_rows=2, reread_budget_tokens=1000)      # 4 rows > 2
    assert not token_rows_pay_off(small, max_rows=8, reread_budget_tokens=100)       # 37+38+39+40 tokens re-read
    assert not token_rows_pay_off([chunk(9, [1, 2, 3], [(8, 9)])], 8, 1000)           # pure decode: already rows


def test_metadata_carries_the_batch_to_the_device():
    b = build_batch([chunk(9, [7, 3, 5], [(8, 9)])], BS, as_rows=False)
    meta = to_metadata(b, BS, lambda a, dtype: torch.from_numpy(a).to(dtype))
    assert meta.decode_only and meta.max_seq_len == 9 and meta.block_tables.dtype == torch.int32
    assert meta.slot_mapping.tolist() == [20] and meta.num_seqs == 1


def test_a_step_survives_its_trip_to_the_other_ranks():
    """Tensor parallelism: the packed int64 message rebuilds the same step on every rank."""
    b = build_batch([chunk(9, [7, 3, 5], [(8, 9)]), chunk(6, [2, 4], [(0, 6)])], BS, as_rows=False)
    step = StepInput(b, TransferPlan(swap_in=[(1, 2), (3, 4)], evict_out=[(5, 6)]), swap_in_now=True,
                     ids_on_device=True)
    got = decode_step(encode_step(step))
    assert got.transfers == step.transfers and got.swap_in_now and got.ids_on_device
    for name in ("input_ids", "positions", "query_start_loc", "seq_lens", "block_tables", "slot_mapping", "logits_rows"):
        want, have = getattr(b, name), getattr(got.batch, name)
        assert have.dtype == want.dtype and np.array_equal(have, want), name
    empty = decode_step(encode_step(StepInput(None, TransferPlan(swap_out=[(9, 9)]), swap_in_now=False)))
    assert empty.batch is None and empty.transfers.swap_out == [(9, 9)]
