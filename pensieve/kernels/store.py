"""KV store kernel: write each new token's K and V into its slot of the paged cache."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _store_kv_kernel(
    k, v, kv_cache, slot_mapping,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_cb, stride_ckv, stride_cs, stride_ch,
    NUM_KV_HEADS: tl.constexpr, H_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping + t).to(tl.int64)
    if slot < 0:
        return  # padding token / token whose KV is not kept
    offs_h = tl.arange(0, H_PAD)
    offs_d = tl.arange(0, D_PAD)
    mask = (offs_h[:, None] < NUM_KV_HEADS) & (offs_d[None, :] < HEAD_DIM)
    # int64 offsets: slot // block_size times the block stride overflows 32 bits on large pools.
    dst = kv_cache + (slot // BLOCK_SIZE) * stride_cb + (slot % BLOCK_SIZE) * stride_cs \
        + offs_h[:, None] * stride_ch + offs_d[None, :]
    kt = tl.load(k + t * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :], mask=mask)
    vt = tl.load(v + t * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :], mask=mask)
    tl.store(dst, kt.to(kv_cache.dtype.element_ty), mask=mask)
    tl.store(dst + stride_ckv, vt.to(kv_cache.dtype.element_ty), mask=mask)


def store_kv_triton(
    k: torch.Tensor,             # [T, Hkv, D]
    v: torch.Tensor,             # [T, Hkv, D]
    kv_cache: torch.Tensor,      # [NB, 2, bs, Hkv, D]
    slot_mapping: torch.Tensor,  # [T] int64, < 0: skip
) -> None:
    T, num_kv_heads, head_dim = k.shape
    if T == 0:
        return
    if not (v.shape == k.shape and kv_cache.shape[3:] == (num_kv_heads, head_dim)):
        raise ValueError("kernel launch contract violated: v.shape == k.shape and kv_cache.shape[3:] == (num_kv_heads, head_dim)")
    if not (k.stride(2) == 1 and v.stride(2) == 1 and kv_cache.stride(4) == 1):
        raise ValueError("head_dim must be contiguous")
    h_pad, d_pad = triton.next_power_of_2(num_kv_heads), triton.next_power_of_2(head_dim)
    _store_kv_kernel[(T,)](
        k, v, kv_cache, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3),
        NUM_KV_HEADS=num_kv_heads, H_PAD=h_pad, HEAD_DIM=head_dim, D_PAD=d_pad,
        BLOCK_SIZE=kv_cache.shape[2],
        num_warps=4 if h_pad * d_pad >= 1024 else 1,
    )
