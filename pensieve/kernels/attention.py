"""Unified paged attention in Triton: one kernel for prefill, chunked prefill, decode and recompute.

Layout of the work:
  * rows of a program = BLOCK_Q query tokens x GROUP_PAD query heads that share one KV head,
    so every KV tile is read once for the whole GQA group;
  * grid axis 0 = query tiles: an upper bound cdiv(T, BLOCK_Q) + B computed from host ints only;
    a program finds its sequence by binary search over query_start_loc and exits if it is spare.
    Decode (every q_len == 1) uses one program per sequence instead;
  * grid axis 1 = KV heads; axis 2 = KV splits (flash-decoding): with more than one split each
    program writes an unnormalised partial (acc, running max, running sum) and a reduction kernel
    merges them. An empty KV range just writes the neutral partial (max=-inf, sum=0). Two launches,
    not a merge by the last split to arrive: that measured the same within 5% on the H100 and needs a
    cross-block handshake (benchmarks/results/kernels/decode-hbm-0baf212/merge_ab.md).
The mask follows per-token positions (kv_pos <= q_pos, kv_pos < seq_len), never batch order, so
non-contiguous new tokens (recomputed prefix + new turn) are handled like any other batch. When every
sequence's new tokens are its suffix (the common prefill), their K/V are read from the layer's own
tensors and only the cached context goes through the block table (NEW_KV), and a batch of whole
prompts (no cached context) compiles without the paged loops (CTX).
Nothing here reads a device tensor on the host, so decode launches can be captured in CUDA graphs.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from pensieve.kernels import device_sms
from pensieve.kernels.metadata import AttentionMetadata

_LOG2E = 1.4426950408889634


@triton.jit
def _find_seq(query_start_loc, num_seqs, pid, BLOCK_Q: tl.constexpr):
    # Largest b whose first tile index (query_start_loc[b] // BLOCK_Q + b) is <= pid.
    # Sequence b owns tiles [first_b, first_{b+1}), a range at least cdiv(q_len_b, BLOCK_Q) long.
    lo = tl.program_id(0) * 0          # a tensor, not a constexpr: it is loop-carried
    hi = lo + num_seqs - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        first = tl.load(query_start_loc + mid) // BLOCK_Q + mid
        ok = first <= pid
        lo = tl.where(ok, mid, lo)
        hi = tl.where(ok, hi, mid - 1)
    return lo


@triton.jit
def _online_softmax(
    acc, m_i, l_i, q, k, v, visible, qk_scale,
    MASKED: tl.constexpr, PRECISION: tl.constexpr,
):
    """One KV tile of flash attention: k [D, N], v [N, D]; visible [M, N] is read only when MASKED."""
    qk = tl.dot(q, k.to(q.dtype), input_precision=PRECISION)              # [M, N] fp32
    if MASKED:
        qk = tl.where(visible, qk, float("-inf"))
    # Scores go to the log2 domain inside exp2's argument: qk * scale - max is one FMA per score.
    # A separate multiply costs a pass over the tile; scaling q once before the loop is 3-5% slower
    # on the H100 and rounds q * scale to 16 bits (benchmarks/results/kernels/prefill-sdpa-a3e479f/levers.md).
    m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
    if MASKED:
        # A row with nothing visible yet keeps max=-inf; subtract 0 instead to avoid inf-inf=nan.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_safe = m_new  # an unmasked tile gives every row finite scores
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(qk * qk_scale - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = tl.dot(p.to(q.dtype), v.to(q.dtype), acc * alpha[:, None], input_precision=PRECISION)
    return acc, m_new, l_i


@triton.jit
def _attend_tile(
    acc, m_i, l_i, q, q_pos, qk_scale,
    kv_head, bt_row, tile, kv_end, k_offs, v_offs, stride_cb, stride_cs,
    offs_d, offs_n,
    BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
    MASKED: tl.constexpr, PRECISION: tl.constexpr, K_ND: tl.constexpr,
):
    """A tile of KV positions read from the paged cache through the block table. kv_head: the
    cache at this program's KV head; k_offs / v_offs: each element's offset inside its page (loop
    invariant, from the caller), so a tile adds one page base per position and nothing else."""
    kv_pos = tile * BLOCK_N + offs_n                                   # [N] int
    if MASKED:
        kv_ok = kv_pos < kv_end
        blk = tl.load(bt_row + kv_pos // BLOCK_SIZE, mask=kv_ok, other=0)
    else:
        kv_ok = offs_n < BLOCK_N                                         # all true: the tile is in range
        blk = tl.load(bt_row + kv_pos // BLOCK_SIZE)
    # One 32 x 32 -> 64-bit multiply per position: block ids times the block stride overflow 32 bits
    # on large pools, and both are non-negative.
    page = blk.to(tl.uint32).to(tl.uint64) * stride_cb.to(tl.uint32).to(tl.uint64)
    if BLOCK_SIZE > BLOCK_N:  # the tile lies inside one page, at this offset
        page += ((tile * BLOCK_N) % BLOCK_SIZE) * stride_cs
    if K_ND:  # K loaded as [N, D] rows (each a contiguous head vector) and transposed for the dot
        k_ptr = kv_head + page[:, None] + k_offs
    else:     # K gathered as [D, N]
        k_ptr = kv_head + page[None, :] + k_offs
    v_ptr = kv_head + page[:, None] + v_offs
    if MASKED or D_PAD != HEAD_DIM:
        d_ok = offs_d < HEAD_DIM
        v = tl.load(v_ptr, mask=kv_ok[:, None] & d_ok[None, :], other=0.0)                   # [N, D]
        if K_ND:
            k = tl.trans(tl.load(k_ptr, mask=kv_ok[:, None] & d_ok[None, :], other=0.0))
        else:
            k = tl.load(k_ptr, mask=kv_ok[None, :] & d_ok[:, None], other=0.0)               # [D, N]
    else:
        v = tl.load(v_ptr)
        k = tl.trans(tl.load(k_ptr)) if K_ND else tl.load(k_ptr)
    visible = (kv_pos[None, :] <= q_pos[:, None]) & kv_ok[None, :]
    return _online_softmax(acc, m_i, l_i, q, k, v, visible, qk_scale, MASKED, PRECISION)


@triton.jit
def _attend_new_tile(
    acc, m_i, l_i, q, tok, qk_scale,
    k_seq, v_seq, k_rows, v_rows, first, j, q_end, stride_knt, stride_vnt,
    offs_d, offs_n,
    BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
    MASKED: tl.constexpr, PRECISION: tl.constexpr,
):
    """Tile j of the sequence's own new tokens (batch rows first + j * N ..), read from the
    contiguous K/V the layer just projected: no block table. k_seq / v_seq point at the sequence's
    first row and this program's KV head, k_rows / v_rows are the tile's loop-invariant offsets.
    Causal by row, which equals causal by position when a sequence's new tokens are its suffix."""
    step = tl.cast(j * BLOCK_N, tl.int64)
    k_ptr = k_seq + step * stride_knt + k_rows
    v_ptr = v_seq + step * stride_vnt + v_rows
    rows = first + j * BLOCK_N + offs_n                                # [N] rows of the batch
    if MASKED or D_PAD != HEAD_DIM:
        mask = (rows < q_end)[:, None] & (offs_d < HEAD_DIM)[None, :]
        k = tl.trans(tl.load(k_ptr, mask=mask, other=0.0))
        v = tl.load(v_ptr, mask=mask, other=0.0)
    else:
        k = tl.trans(tl.load(k_ptr))
        v = tl.load(v_ptr)
    # Rows of the next sequence (or past T) come after every query row of this one: hidden too.
    visible = rows[None, :] <= tok[:, None]
    return _online_softmax(acc, m_i, l_i, q, k, v, visible, qk_scale, MASKED, PRECISION)


# Triton compiles a variant per "== 1 / divisible by 16" class of every int argument: the batch's
# sequence count and block-table width change every step, so they must not pick variants (a
# compile mid-serving stalls every request for about a second).
@triton.jit(do_not_specialize=["num_seqs", "stride_bt"])
def _paged_attention_kernel(
    out, q, kv_cache, block_tables, positions, query_start_loc, seq_lens,
    part_acc, part_ml,                      # split-KV partials (unused when NUM_SPLITS == 1)
    k_new, v_new,                           # the step's new K/V [T, Hkv, D] (read when NEW_KV)
    qk_scale, num_seqs,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_cb, stride_ckv, stride_cs, stride_ch,
    stride_bt, stride_knt, stride_knh, stride_vnt, stride_vnh,
    NEW_KV: tl.constexpr,                   # new tokens' K/V from k_new / v_new instead of the cache
    CTX: tl.constexpr,                      # some sequence has cached context (else no paged loop, NEW_KV only)
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
    NUM_SPLITS: tl.constexpr, DECODE: tl.constexpr, PRECISION: tl.constexpr, K_ND: tl.constexpr,
    PDL_WAIT: tl.constexpr,                 # launched as a programmatic dependent of the kernel before
    PDL_TRIGGER: tl.constexpr,              # the merge kernel after it is one
):
    if PDL_TRIGGER:
        # The merge kernel may be scheduled now (it waits for this whole grid before reading).
        gdc_launch_dependents()
    if DECODE:
        pid = tl.program_id(0)
    else:
        # Highest tiles first: later query tiles see the longest KV ranges, so the causal
        # triangle's long programs start early and the short ones fill the tail.
        pid = tl.num_programs(0) - 1 - tl.program_id(0)
    kvh = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)
    if DECODE:
        # One new token per sequence, so query_start_loc is 0, 1, 2, ...: no load on the path to
        # the first KV tile (each dependent load is a DRAM round trip, a large share of a decode).
        seq = pid
        q_lo = pid
        q_end = pid + 1
    else:
        seq = _find_seq(query_start_loc, num_seqs, pid, BLOCK_Q)
        seq_first = tl.load(query_start_loc + seq)
        q_lo = seq_first + (pid - (seq_first // BLOCK_Q + seq)) * BLOCK_Q
        q_end = tl.load(query_start_loc + seq + 1)
    if q_lo >= q_end:
        return  # a spare program of the upper-bound grid

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    tok = (q_lo + offs_m // GROUP_PAD).to(tl.int64)
    head = kvh * GROUP + offs_m % GROUP_PAD
    row_ok = (offs_m % GROUP_PAD < GROUP) & (tok < q_end)
    if D_PAD == HEAD_DIM:
        qo_mask = row_ok[:, None]
    else:
        qo_mask = row_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    q_pos = tl.load(positions + tok, mask=row_ok, other=0).to(tl.int32)   # 32-bit compares in masks

    seq_len = tl.load(seq_lens + seq)
    bt_row = block_tables + seq.to(tl.int64) * stride_bt
    acc = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    if NEW_KV:
        # Every sequence's new tokens are its last q_len positions (the host checked): the cached
        # context [0, ctx_len) is visible to every row, and the new tokens, causal among themselves,
        # are read from the layer's own K/V below rather than gathered back out of the cache.
        kv_end = seq_len - (q_end - seq_first)
        kv_full = kv_end
    else:
        # Every KV position from the cache, masked by position (any batch, decode included).
        # Positions increase within a sequence: the tile's first/last tokens bound its visible KV.
        last_tok = tl.minimum(q_lo + BLOCK_Q, q_end) - 1
        kv_end = tl.minimum(tl.load(positions + last_tok) + 1, seq_len)      # KV loop bound of this tile
        kv_full = tl.minimum(tl.load(positions + q_lo) + 1, seq_len)         # below it, no row needs a mask
    num_tiles = tl.cdiv(kv_end, BLOCK_N)
    tiles_per_split = tl.cdiv(num_tiles, NUM_SPLITS)
    t_lo = split * tiles_per_split
    t_hi = tl.minimum(t_lo + tiles_per_split, num_tiles)
    t_full = tl.maximum(tl.minimum(kv_full // BLOCK_N, t_hi), t_lo)
    if PDL_WAIT:
        # Everything above read only the step's metadata (written before the step began), so it
        # overlapped the kernel before; q and the cache it may still be writing come after the wait.
        gdc_wait()
    q_tile = tl.load(q + tok[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :], mask=qo_mask, other=0.0)
    q_tile = q_tile.to(kv_cache.dtype.element_ty)
    # Address parts that no tile changes, computed once (int32: a page or a tile of rows spans far
    # less than 2^31 elements). 64-bit row offsets recomputed per tile make the prefill loop 11%
    # longer than a dense kernel's; tests/kernels/test_sass.py keeps it within 5% (benchmarks/sass_loops.py).
    if CTX:
        kv_head = kv_cache + kvh * stride_ch
        in_page = (offs_n % BLOCK_SIZE) * stride_cs                      # [N]
        if K_ND:
            k_offs = in_page[:, None] + offs_d[None, :]
        else:
            k_offs = in_page[None, :] + offs_d[:, None]
        v_offs = in_page[:, None] + stride_ckv + offs_d[None, :]
        for tile in range(t_lo, t_full):
            acc, m_i, l_i = _attend_tile(
                acc, m_i, l_i, q_tile, q_pos, qk_scale, kv_head, bt_row, tile, kv_end, k_offs, v_offs,
                stride_cb, stride_cs, offs_d, offs_n,
                BLOCK_N, BLOCK_SIZE, HEAD_DIM, D_PAD, False, PRECISION, K_ND)
        for tile in range(t_full, t_hi):
            acc, m_i, l_i = _attend_tile(
                acc, m_i, l_i, q_tile, q_pos, qk_scale, kv_head, bt_row, tile, kv_end, k_offs, v_offs,
                stride_cb, stride_cs, offs_d, offs_n,
                BLOCK_N, BLOCK_SIZE, HEAD_DIM, D_PAD, True, PRECISION, K_ND)
    if NEW_KV:
        # New-token tiles start at the sequence's first row; those ending at or before the
        # program's first query row need no mask.
        new_full = (q_lo - seq_first + 1) // BLOCK_N
        new_tiles = tl.cdiv(tl.minimum(q_lo + BLOCK_Q, q_end) - seq_first, BLOCK_N)
        k_seq = k_new + seq_first.to(tl.int64) * stride_knt + kvh * stride_knh
        v_seq = v_new + seq_first.to(tl.int64) * stride_vnt + kvh * stride_vnh
        k_rows = offs_n[:, None] * stride_knt + offs_d[None, :]
        v_rows = offs_n[:, None] * stride_vnt + offs_d[None, :]
        for j in range(0, new_full):
            acc, m_i, l_i = _attend_new_tile(
                acc, m_i, l_i, q_tile, tok, qk_scale, k_seq, v_seq, k_rows, v_rows, seq_first, j, q_end,
                stride_knt, stride_vnt, offs_d, offs_n, BLOCK_N, HEAD_DIM, D_PAD, False, PRECISION)
        for j in range(new_full, new_tiles):
            acc, m_i, l_i = _attend_new_tile(
                acc, m_i, l_i, q_tile, tok, qk_scale, k_seq, v_seq, k_rows, v_rows, seq_first, j, q_end,
                stride_knt, stride_vnt, offs_d, offs_n, BLOCK_N, HEAD_DIM, D_PAD, True, PRECISION)

    if NUM_SPLITS == 1:
        l_safe = tl.where(l_i == 0.0, 1.0, l_i)
        o = acc / l_safe[:, None]
        tl.store(out + tok[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :],
                 o.to(out.dtype.element_ty), mask=qo_mask)
    else:
        # Partials: acc [T, Hq, S, D_PAD], (max, sum) [T, Hq, S, 2], all fp32 and contiguous.
        row = (tok * (GROUP * tl.num_programs(1)) + head) * NUM_SPLITS + split
        tl.store(part_acc + row[:, None] * D_PAD + offs_d[None, :], acc, mask=row_ok[:, None])
        tl.store(part_ml + row * 2, m_i, mask=row_ok)
        tl.store(part_ml + row * 2 + 1, l_i, mask=row_ok)


@triton.jit
def _merge_splits_kernel(
    out, part_acc, part_ml, num_heads, stride_ot, stride_oh,
    NUM_SPLITS: tl.constexpr, S_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
    PDL: tl.constexpr,
):
    if PDL:
        gdc_wait()               # the attention grid's partials, all of them
    tok = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    offs_s = tl.arange(0, S_PAD)
    offs_d = tl.arange(0, D_PAD)
    row = (tok * num_heads + head) * NUM_SPLITS + offs_s
    s_ok = offs_s < NUM_SPLITS
    m = tl.load(part_ml + row * 2, mask=s_ok, other=float("-inf"))
    l = tl.load(part_ml + row * 2 + 1, mask=s_ok, other=0.0)
    m_max = tl.max(m, 0)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)
    w = tl.exp2(m - m_max)                                    # empty splits: exp2(-inf) = 0
    acc = tl.load(part_acc + row[:, None] * D_PAD + offs_d[None, :], mask=s_ok[:, None], other=0.0)
    total = tl.sum(w * l, 0)
    o = tl.sum(acc * w[:, None], 0) / tl.where(total == 0.0, 1.0, total)
    tl.store(out + tok * stride_ot + head * stride_oh + offs_d, o.to(out.dtype.element_ty), mask=offs_d < HEAD_DIM)


@dataclass(frozen=True)
class LaunchConfig:
    block_m: int          # rows per program = block_q tokens x group_pad heads
    block_q: int
    block_n: int          # KV positions per inner-loop tile
    num_splits: int
    num_warps: int
    num_stages: int
    k_nd: bool = False    # load K as [N, D] rows and transpose in registers (else gather it as [D, N])
    # A register cap per thread (ptx .maxnreg), so that two prefill programs share an SM and one's
    # softmax overlaps the other's matrix products; None leaves the compiler's choice (255 at 128 x 128).
    maxnreg: int | None = None
    # Decode on a GPU, programmatic dependent launch (PDL): a kernel so launched is scheduled while the
    # one before it still runs and waits for it on the device. pdl_merge: the merge kernel after the
    # attention kernel; pdl_attention: the attention kernel after the kernel before it (the KV store,
    # which sets no early trigger: one at its start is 1.3-3.4 us slower at most decode shapes,
    # benchmarks/results/kernels/decode-split-424e8c1/decode_pdl.md, "store_trigger").
    pdl_merge: bool = False
    pdl_attention: bool = False


# Tokens x query heads under which a batch of whole prompts takes 64-row tiles (choose_config);
# twice that with one query head per KV head (MHA), whose tiles read four times the KV bytes.
SMALL_PROMPT_WORK = 1 << 18

def choose_config(
    num_seqs: int, max_query_len: int, max_seq_len: int, num_kv_heads: int, group: int,
    head_dim: int, decode_only: bool, on_gpu: bool, num_sms: int = 132, elem_bytes: int = 2,
    prompt_tokens: int | None = None,
) -> LaunchConfig:
    """Tile sizes from host ints only (so a decode launch is graph-capturable). elem_bytes: 4 for
    float32 (tests), whose KV tiles are twice as large: at most 64 positions and 2 stages on a GPU.
    Measured on the H100 with Llama-3-8B heads unless named; files under benchmarks/results/kernels/.

    Prefill: 128 rows x 64 KV positions, 8 warps, 2 stages, K loaded as rows, capped at 128 registers
    per thread so that two programs share an SM and one's softmax overlaps the other's matrix
    products (64 x 32 for head_dim > 128, to fit shared memory). Uncapped 128 x 128 tiles take 255
    registers and 165 KB, one program per SM, tensor pipe 38% busy; the cap makes 4 x 1024 and
    4 x 2048 tokens 17% and 14% faster, 1 x 4096 2% slower (kernels/prefill-sdpa-a3e479f/ncu.txt, prefill_regs.md).
    prompt_tokens: the batch is whole prompts (no cached context, new K/V from the layer) of this
    many tokens. Below SMALL_PROMPT_WORK tokens x query heads (8192 tokens of Llama-3-8B) such a
    batch has too few 128-row programs to spread the causal triangle's uneven work over the SMs:
    64-row tiles, 4 warps, 3 stages run 1 x 4096 13% and 4 x 1024 7% faster; above it they lose
    1-3%, over cached context 8-20% (kernels/prefill-final-ab8d7ce/prefill_probe_final.md, prefill_rule_b0deceb.md). MHA
    takes twice the threshold: it still gains 2-9% at 8192 tokens and is within 2% or 3% behind at
    16384 (kernels/prefill-final-ab8d7ce/prefill_rule_mha_75bccb3.md).
    Decode: tiles of >= 16 rows (every tl.dot side >= 16), split over KV until about four programs
    per SM are busy (not below 64 positions per split), 2 stages, 32-position tiles from 16 splits
    up (64 below), programmatic dependent launches at 8+ splits (decode_launch). Across batch 1-16
    x 4k-32k the best split count gives about 512 programs and 9 of 10 shapes are fastest at 2
    stages (3 cost 20% at 32 x 4k) (kernels/decode-split-424e8c1/decode_sweep_*.md, graphs replayed round-robin).
    CPU interpreter: its cost grows with the tile count, so fewer, bigger tiles.
    """
    group_pad = triton.next_power_of_2(group)
    d_pad = triton.next_power_of_2(head_dim)
    if decode_only:
        if on_gpu:
            programs = max(1, num_seqs * num_kv_heads)
            splits = min(triton.cdiv(4 * num_sms, programs), max(1, max_seq_len // 64), DECODE_SPLITS[-1])
            return decode_launch(1 << (splits.bit_length() - 1), group, elem_bytes)
        splits = min(4, max(1, triton.cdiv(max_seq_len, 32)))  # exercise the split path in tests
        return LaunchConfig(max(16, group_pad), 1, 32, splits, 4, 1)
    if on_gpu:
        big = 128 if d_pad <= 128 else 64
        rows = max(16, triton.next_power_of_2(max(1, max_query_len)) * group_pad)
        block_m = max(group_pad, min(big, rows), 16)
        if block_m >= 128 and d_pad <= 128:
            small_work = SMALL_PROMPT_WORK * (2 if group == 1 else 1)
            if prompt_tokens is not None and prompt_tokens * num_kv_heads * group < small_work:
                return _fit(LaunchConfig(64, 64 // group_pad, 64, 1, 4, 3, k_nd=True), on_gpu, elem_bytes)
            return _fit(LaunchConfig(block_m, block_m // group_pad, 64, 1, 8, 2, k_nd=True, maxnreg=128),
                        on_gpu, elem_bytes)
        block_n = 128 if d_pad <= 128 else 32
        num_warps, num_stages, k_nd = 4, 2, False
    else:
        rows = max(16, triton.next_power_of_2(max(1, max_query_len)) * group_pad)
        block_m = max(group_pad, min(64, rows), 16)
        block_n = 32
        num_warps, num_stages, k_nd = 4, 1, False
    return _fit(LaunchConfig(block_m, block_m // group_pad, block_n, 1, num_warps, num_stages, k_nd), on_gpu, elem_bytes)


# NUM_SPLITS is a compile-time constant: powers of two keep decode to these compiled variants, all of
# which the model runner compiles at start-up (warm_up_attention).
DECODE_SPLITS = (1, 2, 4, 8, 16, 32, 64)


@functools.lru_cache(maxsize=64)
def decode_launch(splits: int, group: int, elem_bytes: int = 2) -> LaunchConfig:
    """The GPU decode launch for a split count. Everything but the split count follows from it, so the
    start-up warm-up compiles exactly the variants choose_config picks."""
    # PDL pays where launches are a visible share of the step: after the KV store, as in a layer,
    # 0.5-0.8 us (2-6%) faster at batch 1-4 of Llama-3-8B heads (16-64 splits), even at 8 (8 splits),
    # 2.5% slower at 16 (4 splits) (H100, benchmarks/results/kernels/decode-split-424e8c1/decode_pdl.md).
    pdl = splits >= 8
    block_m = max(16, triton.next_power_of_2(group))
    return _fit(LaunchConfig(block_m, 1, 32 if splits >= 16 else 64, splits, 4, 2, pdl_merge=pdl, pdl_attention=pdl),
                True, elem_bytes)


def _fit(config: LaunchConfig, on_gpu: bool, elem_bytes: int) -> LaunchConfig:
    if on_gpu and elem_bytes > 2:  # float32 KV tiles must still fit shared memory
        return replace(config, block_n=min(config.block_n, 64), num_stages=min(config.num_stages, 2))
    return config


def paged_attention_triton(
    q: torch.Tensor,             # [T, Hq, D]
    kv_cache: torch.Tensor,      # [NB, 2, bs, Hkv, D]
    meta: AttentionMetadata,
    scale: float,
    config: LaunchConfig | None = None,
    k: torch.Tensor | None = None,   # [T, Hkv, D]: the new tokens' K/V, already stored in the cache
    v: torch.Tensor | None = None,
) -> torch.Tensor:               # [T, Hq, D]
    T, num_heads, head_dim = q.shape
    _, two, block_size, num_kv_heads, kv_dim = kv_cache.shape
    if not (two == 2 and kv_dim == head_dim and num_heads % num_kv_heads == 0):
        raise ValueError("kernel launch contract violated: two == 2 and kv_dim == head_dim and num_heads % num_kv_heads == 0")
    if not (q.stride(2) == 1 and kv_cache.stride(4) == 1):
        raise ValueError("head_dim must be contiguous")
    # a power of two, so a KV tile lies inside one page or spans whole ones
    if block_size & (block_size - 1):
        raise ValueError("block_size must be a power of two")
    group = num_heads // num_kv_heads
    num_seqs = meta.num_seqs
    out = torch.empty_like(q)
    if T == 0 or num_seqs == 0:
        return out
    on_gpu = q.is_cuda
    # New tokens' K/V from the layer's tensors: the same values the store wrote, read without the
    # block table: 0-3% less time than the gather on the H100 at the default launch, 18-25% less at
    # the 64-row one (benchmarks/results/kernels/prefill-final-ab8d7ce/prefill_probe_final.md, "ours" vs "gather").
    new_kv = (k is not None and v is not None and not meta.decode_only and meta.new_tokens_are_suffix
              and k.dtype == v.dtype == kv_cache.dtype)
    if config is None:
        sms = device_sms(q) if on_gpu else 132
        config = choose_config(num_seqs, meta.max_query_len, meta.max_seq_len, num_kv_heads, group,
                               head_dim, meta.decode_only, on_gpu, sms, kv_cache.element_size(),
                               prompt_tokens=T if new_kv and not meta.has_context else None)
    group_pad = triton.next_power_of_2(group)
    d_pad = triton.next_power_of_2(head_dim)
    decode = meta.decode_only and config.block_q == 1
    splits = config.num_splits
    if decode:
        grid = (num_seqs, num_kv_heads, splits)
    else:
        if splits != 1:
            raise ValueError("split-KV is for decode batches only")
        grid = (triton.cdiv(T, config.block_q) + num_seqs, num_kv_heads, 1)
    if splits > 1:
        part_acc = torch.empty((T, num_heads, splits, d_pad), dtype=torch.float32, device=q.device)
        part_ml = torch.empty((T, num_heads, splits, 2), dtype=torch.float32, device=q.device)
    else:
        part_acc = part_ml = out  # never touched
    k_new, v_new = (k, v) if new_kv else (q, q)   # unread unless NEW_KV
    k_strides = (k.stride(0), k.stride(1)) if new_kv else (0, 0)
    v_strides = (v.stride(0), v.stride(1)) if new_kv else (0, 0)
    pdl_attention = config.pdl_attention and decode and on_gpu
    pdl_merge = config.pdl_merge and decode and on_gpu and splits > 1
    # fp32 runs are for testing: keep them exact (the GPU would default to tf32).
    precision = "ieee" if kv_cache.dtype == torch.float32 else "tf32"
    _paged_attention_kernel[grid](
        out, q, kv_cache, meta.block_tables, meta.positions, meta.query_start_loc, meta.seq_lens,
        part_acc, part_ml, k_new, v_new,
        scale * _LOG2E, num_seqs,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3),
        meta.block_tables.stride(0), *k_strides, *v_strides,
        NEW_KV=new_kv, CTX=not new_kv or meta.has_context,
        GROUP=group, GROUP_PAD=group_pad, BLOCK_Q=config.block_q, BLOCK_M=config.block_m,
        BLOCK_N=config.block_n, BLOCK_SIZE=block_size, HEAD_DIM=head_dim, D_PAD=d_pad,
        NUM_SPLITS=splits, DECODE=decode, PRECISION=precision, K_ND=config.k_nd,
        PDL_WAIT=pdl_attention, PDL_TRIGGER=pdl_merge,
        num_warps=config.num_warps, num_stages=config.num_stages,
        **({"maxnreg": config.maxnreg} if config.maxnreg and on_gpu else {}),
        **({"launch_pdl": True} if pdl_attention else {}),
    )
    if splits > 1:
        _merge_splits_kernel[(T, num_heads)](
            out, part_acc, part_ml, num_heads, out.stride(0), out.stride(1),
            NUM_SPLITS=splits, S_PAD=triton.next_power_of_2(splits), HEAD_DIM=head_dim, D_PAD=d_pad, PDL=pdl_merge,
            num_warps=4 if d_pad >= 128 else 1, **({"launch_pdl": True} if pdl_merge else {}),
        )
    return out


def warm_up_attention(kv_cache: torch.Tensor, num_heads: int, dtype: torch.dtype) -> int:
    """Compile every kernel variant the engine can launch, so no request waits on the JIT.

    Triton compiles on first use (about half a second per variant): without this, the first
    requests of each new shape stall. Runs each decode split count and each prefill tile size
    once on a tiny batch over the real cache tensor (same strides, same specialisations).
    Returns the number of launches.
    """
    device = kv_cache.device
    _, _, block_size, num_kv_heads, head_dim = kv_cache.shape
    group = num_heads // num_kv_heads
    group_pad = triton.next_power_of_2(group)
    launches = 0
    # Triton also specialises integer arguments equal to 1 or divisible by 16 (num_seqs here)
    for num_seqs in (1, 3, 16):
        for splits in DECODE_SPLITS:  # decode: one token per sequence
            meta = _tiny_meta(num_seqs, 1, block_size, device)
            q = torch.randn(num_seqs, num_heads, head_dim, dtype=dtype, device=device)
            paged_attention_triton(q, kv_cache, meta, 1.0, decode_launch(splits, group, kv_cache.element_size()))
            launches += 1
        for q_len in (2, 4, 8, 16, 32, 64, 128):  # prefill tile sizes: block_m grows with the query length
            if q_len * group_pad > 128 and q_len > 2:
                break
            meta = _tiny_meta(num_seqs, q_len, block_size, device)        # whole prompts: no context
            # q, k, v as views of one projection, as the model passes them (same strides)
            qkv = torch.randn(num_seqs * q_len, num_heads + 2 * num_kv_heads, head_dim, dtype=dtype, device=device)
            q, k, v = qkv.split([num_heads, num_kv_heads, num_kv_heads], dim=1)
            paged_attention_triton(q, kv_cache, meta, 1.0)                # new K/V from the cache (recompute)
            paged_attention_triton(q, kv_cache, replace(meta, has_context=True), 1.0, k=k, v=v)  # a new turn
            # whole prompts, no paged loops: a small batch's launch and a large one's (the default)
            launch = functools.partial(choose_config, num_seqs, q_len, q_len, num_kv_heads, group, head_dim, False,
                                       True, elem_bytes=kv_cache.element_size())
            for config in {launch(prompt_tokens=num_seqs * q_len), launch()}:
                paged_attention_triton(q, kv_cache, meta, 1.0, config, k=k, v=v)
                launches += 1
            launches += 2
    torch.cuda.synchronize(device)
    return launches


def _tiny_meta(num_seqs: int, q_len: int, block_size: int, device: torch.device) -> AttentionMetadata:
    """num_seqs sequences of q_len new tokens each, all reading block 0 (warm-up only)."""
    positions = torch.arange(q_len, device=device).repeat(num_seqs)
    return AttentionMetadata(
        positions=positions,
        query_start_loc=torch.arange(0, (num_seqs + 1) * q_len, q_len, dtype=torch.int32, device=device),
        seq_lens=torch.full((num_seqs,), q_len, dtype=torch.int32, device=device),
        block_tables=torch.zeros(num_seqs, triton.cdiv(q_len, block_size), dtype=torch.int32, device=device),
        slot_mapping=torch.full((num_seqs * q_len,), -1, dtype=torch.int64, device=device),
        block_size=block_size, max_query_len=q_len, max_seq_len=q_len, decode_only=q_len == 1,
        new_tokens_are_suffix=True, has_context=False)
