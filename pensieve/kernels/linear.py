"""Small-batch linear, y = x W^T (+ b) for a few rows (up to 64): the decode step's weight stream.

A decode step reads every weight once for a few rows, so its linears are bound by HBM, not by the
tensor cores, and how well they stream is the step's time. Each program reads a tile of W's rows
through the whole (or a range of the) K dimension and keeps the rows of x beside it. When W has too
few row tiles to keep the SMs streaming (the narrow outputs of small models), K is split too: each range writes an
fp32 partial, and the last range of a tile to arrive (a per-tile counter) sums the partials in a fixed
order and writes the output. So the result is deterministic, and nothing but the output and the
counter (left at zero) is written: no zeroed buffer, no second launch.

SWAP_AB puts W on the matrix unit's M side (acc^T = W x^T): Hopper's wgmma needs M >= 64 per warpgroup,
which x's few rows are not, while W's row tile is.

Measured on the H100 (Llama-3.1-8B and Llama-2-13B weights at 8 rows, 104 launches,
benchmarks/results/kernels/linear-835ab1c/linear_sweep_0cd076c.md and linear_sweep.md): one launch, 64 W rows
x 256 K per step, 4 stages, no K split, is within 2% of the best launch on every shape and 6% faster
than cuBLAS on their geometric mean (o_proj 16%, lm_head 9%, gate_up / down 4-8%). Splitting K never
pays on these shapes, even at 64 row tiles; it stays for narrow outputs (small models), where row tiles
alone would leave most SMs idle.

At 32 rows it still leads cuBLAS on every shape (by 1-3%); at 64 cuBLAS leads on most, so the model's
linears use it up to 32 rows (pensieve.kernels.SMALL_BATCH_MAX_ROWS). In the engine (Llama-3.1-8B,
ctx 1024) decode steps take 6.06 ms instead of cuBLAS's 6.48 at batch 1 and 6.55 instead of 6.87 at
batch 8 (benchmarks/results/engine-tuning/linear-9073f1a/engine_8b_small.md, engine_8b_cublas.md).

The row count picks one of three variants (16 / 32 / 64 rows per program) and nothing else, so the
decode graphs' warm-up (every graphed batch size runs once before capture) compiles them all.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

from pensieve.kernels import SmallLinearWorkspace, device_sms

MAX_ROWS = 64  # what a launch can take; the model's linears use it up to SMALL_BATCH_MAX_ROWS


@triton.jit(do_not_specialize=["M"])
def _small_batch_linear_kernel(
    x, w, bias, y, partials, counters,
    M, N, K, stride_xm, stride_wn, stride_ym, k_per_split,
    SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr, SWAP_AB: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    n_ok = offs_n < N
    k_lo = pid_k * k_per_split                     # k_per_split: a multiple of BLOCK_K
    k_hi = tl.minimum(k_lo + k_per_split, K)
    x_ptrs = x + offs_m[:, None] * stride_xm + offs_k[None, :]
    w_ptrs = w + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :]
    if SWAP_AB:
        acc_t = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        if EVEN_K:
            xt = tl.load(x_ptrs + k0, mask=m_ok[:, None], other=0.0)
            wt = tl.load(w_ptrs + k0, mask=n_ok[:, None], other=0.0)
        else:
            k_ok = (k0 + offs_k) < K
            xt = tl.load(x_ptrs + k0, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            wt = tl.load(w_ptrs + k0, mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        if SWAP_AB:
            acc_t = tl.dot(wt, tl.trans(xt.to(wt.dtype)), acc_t, input_precision=PRECISION)
        else:
            acc = tl.dot(xt.to(wt.dtype), tl.trans(wt), acc, input_precision=PRECISION)
    if SWAP_AB:
        acc = tl.trans(acc_t)
    out_mask = m_ok[:, None] & n_ok[None, :]
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(bias + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(y + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(y.dtype.element_ty), mask=out_mask)
    else:
        # partials [SPLIT_K, BLOCK_M, N] fp32
        tl.store(partials + (pid_k * BLOCK_M + offs_m[:, None]) * N + offs_n[None, :], acc, mask=out_mask)
        tl.debug_barrier()  # every thread's partial is written before the tile's counter counts this range in
        arrived = tl.atomic_add(counters + pid_n, 1, sem="acq_rel")
        if arrived == SPLIT_K - 1:  # the last range of this tile: sum all ranges in order
            total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for s in range(SPLIT_K):
                total += tl.load(partials + (s * BLOCK_M + offs_m[:, None]) * N + offs_n[None, :],
                                 mask=out_mask, other=0.0, cache_modifier=".cg")
            if HAS_BIAS:
                total += tl.load(bias + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
            tl.store(y + offs_m[:, None] * stride_ym + offs_n[None, :], total.to(y.dtype.element_ty), mask=out_mask)
            tl.store(counters + pid_n, 0)  # ready for the next call


@dataclass(frozen=True)
class SmallLinearConfig:
    block_n: int = 64       # W rows per program
    block_k: int = 256      # K per loop step
    split_k: int = 1        # K ranges per row tile
    swap_ab: bool = True
    num_warps: int = 4
    num_stages: int = 4


def choose_small_linear(n: int, k: int, num_sms: int) -> SmallLinearConfig:
    """Whole-K programs over 64-row tiles; K split only while there are fewer than a third as many
    programs as SMs (64 programs on the H100's 132 streamed at 81%, split or not), keeping >= 2 loop
    steps per range."""
    cfg = SmallLinearConfig()
    tiles = triton.cdiv(n, cfg.block_n)
    split = 1
    while tiles * split < num_sms // 3 and k // (2 * split * cfg.block_k) >= 2:
        split *= 2
    return SmallLinearConfig(split_k=split)


def rows_per_program(m: int) -> int:
    return max(16, triton.next_power_of_2(m))


SHARED_MEMORY_BYTES = 200 << 10  # of the H100's 227 KB per program, with room for the compiler's own


def fit_shared_memory(cfg: SmallLinearConfig, block_m: int, elem_bytes: int) -> SmallLinearConfig:
    """Fewer stages (then shorter K steps) until every stage's W and x tiles fit: 64-row programs
    take 3 stages of the default's 4, whose 256 KB of shared memory fail to launch on the H100."""
    def size(c: SmallLinearConfig) -> int:
        return (c.block_n + block_m) * c.block_k * elem_bytes * c.num_stages

    while size(cfg) > SHARED_MEMORY_BYTES and cfg.num_stages > 2:
        cfg = replace(cfg, num_stages=cfg.num_stages - 1)
    while size(cfg) > SHARED_MEMORY_BYTES and cfg.block_k > 32:
        cfg = replace(cfg, block_k=cfg.block_k // 2)
    return cfg


@functools.lru_cache(maxsize=512)
def default_launch(n: int, k: int, block_m: int, elem_bytes: int, num_sms: int) -> SmallLinearConfig:
    """The launch for a weight shape and row class (pure; cached: it runs for every eager call)."""
    return fit_shared_memory(choose_small_linear(n, k, num_sms), block_m, elem_bytes)


def small_batch_linear(
    x: torch.Tensor,                 # [M <= 64, K], K contiguous
    weight: torch.Tensor,            # [N, K], K contiguous
    bias: torch.Tensor | None,       # [N]
    workspace: SmallLinearWorkspace,
    config: SmallLinearConfig | None = None,
    num_sms: int | None = None,
) -> torch.Tensor:                   # [M, N]
    m, k = x.shape
    n = weight.shape[0]
    if not (m <= MAX_ROWS and weight.shape[1] == k and x.stride(1) == 1 and weight.stride(1) == 1):
        raise ValueError("kernel launch contract violated: m <= MAX_ROWS and weight.shape[1] == k and x.stride(1) == 1 and weight.stride(1) == 1")
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return y
    block_m = rows_per_program(m)
    if config is None:
        cfg = default_launch(n, k, block_m, x.element_size(), num_sms or (device_sms(x) if x.is_cuda else 132))
    else:
        cfg = fit_shared_memory(config, block_m, x.element_size())
    k_per_split = triton.cdiv(triton.cdiv(k, cfg.split_k), cfg.block_k) * cfg.block_k
    split = triton.cdiv(k, k_per_split)  # ranges that hold any K (fewer than asked when K is short)
    if split > 1:  # sized for the most rows, so the first call (before any graph capture) allocates for good
        partials, counters = workspace.get(cfg.split_k * MAX_ROWS * n, triton.cdiv(n, cfg.block_n), x.device)
    else:
        partials = counters = y  # never touched
    _small_batch_linear_kernel[(triton.cdiv(n, cfg.block_n), split)](
        x, weight, bias if bias is not None else weight, y, partials, counters,
        m, n, k, x.stride(0), weight.stride(0), y.stride(0), k_per_split,
        SPLIT_K=split, HAS_BIAS=bias is not None, SWAP_AB=cfg.swap_ab, EVEN_K=k % cfg.block_k == 0,
        BLOCK_M=block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32",  # fp32 (tests) exact; halves ignore it
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return y
