"""PyTorch reference implementations of the kernels: the CPU path and the tests' oracle."""
from __future__ import annotations

import torch

from pensieve.kernels.metadata import AttentionMetadata


def store_kv_reference(
    k: torch.Tensor,             # [T, Hkv, D]
    v: torch.Tensor,             # [T, Hkv, D]
    kv_cache: torch.Tensor,      # [NB, 2, bs, Hkv, D]
    slot_mapping: torch.Tensor,  # [T] int64, < 0: skip
) -> None:
    block_size = kv_cache.shape[2]
    valid = slot_mapping >= 0
    slots = slot_mapping[valid]
    blocks, offsets = slots // block_size, slots % block_size
    kv_cache[blocks, 0, offsets] = k[valid].to(kv_cache.dtype)
    kv_cache[blocks, 1, offsets] = v[valid].to(kv_cache.dtype)


def paged_attention_reference(
    q: torch.Tensor,             # [T, Hq, D]
    kv_cache: torch.Tensor,      # [NB, 2, bs, Hkv, D]
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:               # [T, Hq, D]
    T, num_heads, head_dim = q.shape
    block_size, num_kv_heads = kv_cache.shape[2], kv_cache.shape[3]
    group = num_heads // num_kv_heads
    out = torch.empty_like(q)
    starts = meta.query_start_loc.tolist()
    seq_lens = meta.seq_lens.tolist()
    for b, seq_len in enumerate(seq_lens):
        q_lo, q_hi = starts[b], starts[b + 1]
        if q_hi == q_lo:
            continue
        num_blocks = -(-seq_len // block_size)
        blocks = meta.block_tables[b, :num_blocks].long()
        kv = kv_cache[blocks]                                    # [nb, 2, bs, Hkv, D]
        k = kv[:, 0].reshape(-1, num_kv_heads, head_dim)[:seq_len].float()
        v = kv[:, 1].reshape(-1, num_kv_heads, head_dim)[:seq_len].float()
        k = k.repeat_interleave(group, dim=1)                     # [S, Hq, D]
        v = v.repeat_interleave(group, dim=1)
        qs = q[q_lo:q_hi].float()                                 # [L, Hq, D]
        scores = torch.einsum("lhd,shd->hls", qs, k) * scale      # [Hq, L, S]
        q_pos = meta.positions[q_lo:q_hi].view(1, -1, 1)
        kv_pos = torch.arange(seq_len, device=q.device).view(1, 1, -1)
        scores = scores.masked_fill(kv_pos > q_pos, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        out[q_lo:q_hi] = torch.einsum("hls,shd->lhd", probs, v).to(q.dtype)
    return out


def copy_blocks_reference(
    src: torch.Tensor,           # [NBs, ...] one layer of a pool
    dst: torch.Tensor,           # [NBd, ...] one layer of a pool (may live on another device)
    src_ids: torch.Tensor,       # [N] int64
    dst_ids: torch.Tensor,       # [N] int64
) -> None:
    moved = src.index_select(0, src_ids.to(src.device)).to(dst.device, non_blocking=True)
    dst.index_copy_(0, dst_ids.to(dst.device), moved)
