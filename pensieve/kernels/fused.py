"""Fused elementwise kernels of the decoder layer: rotary embedding, residual add + RMSNorm, SiLU-and-mul.

Each replaces several PyTorch kernels with one. In a graphed decode step of a small batch every kernel
is a few microseconds of launch and tail latency, not bandwidth: unfused, on the H100 (Llama-3.1-8B,
batch 8) the norms and elementwise ops take ~1.1 ms of a 7.4 ms graph, about 13 kernels per layer next
to the GEMMs and attention (benchmarks/results/engine-tuning/copy-overlap-75e97c5/decode_profile.txt); fused, the
graph is 11-13% faster (engine-tuning/fused-async-76c3b02/engine.md, PENSIEVE_FUSED_KERNELS=0 for the A/B). The PyTorch versions in
pensieve.model.layers stay the reference (CPU runs and tests); these run on CUDA tensors.

Row counts change every step and only size the grid (no kernel argument), so no new variant compiles
mid-serving.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rotary_kernel(
    x, cos_sin, positions,
    stride_xt, stride_xh, stride_cs,
    NUM_HEADS: tl.constexpr, H_PAD: tl.constexpr, HALF: tl.constexpr, HALF_PAD: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(positions + t).to(tl.int64)
    offs_d = tl.arange(0, HALF_PAD)
    offs_h = tl.arange(0, H_PAD)
    d_ok = offs_d < HALF
    cos = tl.load(cos_sin + pos * stride_cs + offs_d, mask=d_ok, other=0.0)[None, :]          # fp32
    sin = tl.load(cos_sin + pos * stride_cs + HALF + offs_d, mask=d_ok, other=0.0)[None, :]
    mask = (offs_h[:, None] < NUM_HEADS) & d_ok[None, :]
    lo = x + t * stride_xt + offs_h[:, None] * stride_xh + offs_d[None, :]
    x1 = tl.load(lo, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(lo + HALF, mask=mask, other=0.0).to(tl.float32)
    # neox style (rotate halves): [x1, x2] -> [x1 cos - x2 sin, x2 cos + x1 sin]
    tl.store(lo, (x1 * cos - x2 * sin).to(x.dtype.element_ty), mask=mask)
    tl.store(lo + HALF, (x2 * cos + x1 * sin).to(x.dtype.element_ty), mask=mask)


def rotary_inplace(
    x: torch.Tensor,          # [T, H, D], any row stride, head_dim contiguous: q and k heads together
    cos_sin: torch.Tensor,    # [max_positions, D] fp32: cos of the D/2 frequencies, then sin
    positions: torch.Tensor,  # [T] int
) -> torch.Tensor:
    T, num_heads, head_dim = x.shape
    if not (x.stride(2) == 1 and cos_sin.stride(1) == 1 and head_dim % 2 == 0):
        raise ValueError("kernel launch contract violated: x.stride(2) == 1 and cos_sin.stride(1) == 1 and head_dim % 2 == 0")
    if T:
        half = head_dim // 2
        _rotary_kernel[(T,)](
            x, cos_sin, positions, x.stride(0), x.stride(1), cos_sin.stride(0),
            NUM_HEADS=num_heads, H_PAD=triton.next_power_of_2(num_heads), HALF=half,
            HALF_PAD=triton.next_power_of_2(half), num_warps=4 if num_heads * half >= 1024 else 1)
    return x


@triton.jit
def _add_rms_norm_kernel(
    x, residual, weight, out, new_residual, eps,
    stride_x, stride_r, stride_o, stride_n,
    DIM: tl.constexpr, BLOCK: tl.constexpr, ADD: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    ok = offs < DIM
    h = tl.load(x + row * stride_x + offs, mask=ok, other=0.0)
    if ADD:
        # The sum is rounded to the model dtype first, as the unfused `x + residual` would be.
        h = (h + tl.load(residual + row * stride_r + offs, mask=ok, other=0.0)).to(x.dtype.element_ty)
        tl.store(new_residual + row * stride_n + offs, h, mask=ok)
    hf = h.to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.sum(hf * hf, 0) / DIM + eps)
    w = tl.load(weight + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(out + row * stride_o + offs, (hf * inv * w).to(out.dtype.element_ty), mask=ok)


def add_rms_norm(
    x: torch.Tensor,                  # [T, dim]
    residual: torch.Tensor | None,    # [T, dim] or None
    weight: torch.Tensor,             # [dim]
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor | None]:  # norm(x + residual), x + residual (None without residual)
    T, dim = x.shape
    if not (x.stride(1) == 1 and weight.is_contiguous()):
        raise ValueError("kernel launch contract violated: x.stride(1) == 1 and weight.is_contiguous()")
    out = torch.empty_like(x)
    new_residual = torch.empty_like(x) if residual is not None else None
    if T:
        block = triton.next_power_of_2(dim)
        r = residual if residual is not None else x
        n = new_residual if new_residual is not None else out
        _add_rms_norm_kernel[(T,)](
            x, r, weight, out, n, eps, x.stride(0), r.stride(0), out.stride(0), n.stride(0),
            DIM=dim, BLOCK=block, ADD=residual is not None,
            num_warps=min(16, max(1, block // 256)))
    return out, new_residual


@triton.jit
def _silu_and_mul_kernel(
    x, out, stride_x, stride_o,
    INTER: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < INTER
    gate = tl.load(x + row * stride_x + offs, mask=ok, other=0.0).to(tl.float32)
    up = tl.load(x + row * stride_x + INTER + offs, mask=ok, other=0.0).to(tl.float32)
    # the gate's SiLU is rounded to the model dtype before the product, as F.silu(gate) * up is
    act = (gate / (1.0 + tl.exp(-gate))).to(x.dtype.element_ty).to(tl.float32)
    tl.store(out + row * stride_o + offs, (act * up).to(out.dtype.element_ty), mask=ok)


def silu_and_mul_triton(x: torch.Tensor) -> torch.Tensor:  # [T, 2 * I] -> [T, I]
    T, two_inter = x.shape
    inter = two_inter // 2
    if x.stride(1) != 1:
        raise ValueError("kernel launch contract violated: x.stride(1) == 1")
    out = torch.empty((T, inter), dtype=x.dtype, device=x.device)
    if T:
        block = 1024
        _silu_and_mul_kernel[(T, triton.cdiv(inter, block))](
            x, out, x.stride(0), out.stride(0), INTER=inter, BLOCK=block, num_warps=4)
    return out
