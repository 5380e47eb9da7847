"""Block copy between KV pools of one layer: GPU<->GPU and pinned host<->GPU in one gather kernel.

A pinned host tensor's pointer is valid on the device under unified virtual addressing: Triton's
launcher asks the driver for the device pointer of every pointer argument
(cuPointerGetAttribute(DEVICE_POINTER)), which succeeds for page-locked memory registered with
CUDA, so one kernel can read or write host memory directly. One launch moves N scattered blocks,
which keeps many small (64-80 KB) blocks near the PCIe ceiling where N separate copies would not.
The kernel runs on the current stream, so callers put it on a copy stream and record events.
Pageable host memory cannot be mapped: such copies fall back to one copy_ per run of consecutive
block ids.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# 8 programs reach 76-80% of PCIe on the H100 with the most of it hidden behind a forward; 4 reach about
# half (benchmarks/results/engine-tuning/engine.md and copy-overlap-75e97c5/engine.md, the kernelN rows).
_MAX_PROGRAMS = 8
_CHUNK_BYTES = 16384  # bytes per program: 16 KB keeps enough loads in flight to cover PCIe latency


@triton.jit(do_not_specialize=["num_items"])  # one compiled variant for any block count
def _copy_blocks_kernel(
    src, dst, src_ids, dst_ids, row_elems, stride_src, stride_dst, num_items, chunks_per_row,
    CHUNK: tl.constexpr,
):
    # A persistent grid of few programs, each looping over (block, chunk) items: a copy over PCIe
    # mostly waits, and occupying every SM would stall the forward it is meant to overlap with.
    for item in range(tl.program_id(0), num_items, tl.num_programs(0)):
        i = item // chunks_per_row
        c = (item % chunks_per_row).to(tl.int64)
        s = tl.load(src_ids + i).to(tl.int64)
        d = tl.load(dst_ids + i).to(tl.int64)
        offs = c * CHUNK + tl.arange(0, CHUNK)
        mask = offs < row_elems
        x = tl.load(src + s * stride_src + offs, mask=mask)
        tl.store(dst + d * stride_dst + offs, x, mask=mask)


def _rows(pool: torch.Tensor) -> torch.Tensor:
    """[NB, ...] -> [NB, row] as a view (each block row must be contiguous)."""
    if not pool[0].is_contiguous():
        raise ValueError("each block of a pool must be contiguous")
    return pool.as_strided((pool.shape[0], pool[0].numel()), (pool.stride(0), 1))


def launch_copy_kernel(
    src: torch.Tensor,       # [NBs, ...] pool of one layer (device, pinned host, or CPU under the interpreter)
    dst: torch.Tensor,       # [NBd, ...] same block shape and dtype
    src_ids: torch.Tensor,   # [N] int32/int64, on the device that runs the kernel
    dst_ids: torch.Tensor,   # [N]
) -> None:
    """One launch: dst[dst_ids[i]] = src[src_ids[i]]; no checks of where memory lives."""
    if not (src.dtype == dst.dtype and src.shape[1:] == dst.shape[1:]):
        raise ValueError("kernel launch contract violated: src.dtype == dst.dtype and src.shape[1:] == dst.shape[1:]")
    n = src_ids.numel()
    if n == 0:
        return
    s, d = _rows(src), _rows(dst)
    row_elems = s.shape[1]
    chunk = min(triton.next_power_of_2(row_elems), max(1, _CHUNK_BYTES // src.element_size()))
    chunks_per_row = triton.cdiv(row_elems, chunk)
    num_items = n * chunks_per_row
    grid = (min(num_items, _MAX_PROGRAMS),)
    _copy_blocks_kernel[grid](s, d, src_ids, dst_ids, row_elems, s.stride(0), d.stride(0), num_items,
                              chunks_per_row, CHUNK=chunk, num_warps=8 if chunk * src.element_size() >= 8192 else 4)


def copy_blocks_runs(
    src: torch.Tensor,       # [NBs, ...]
    dst: torch.Tensor,       # [NBd, ...]
    src_ids: torch.Tensor,   # [N] (read on the host)
    dst_ids: torch.Tensor,   # [N]
) -> None:
    """Fallback: one non_blocking copy_ per run of ids consecutive on both sides."""
    pairs = list(zip(src_ids.tolist(), dst_ids.tolist()))
    i = 0
    while i < len(pairs):
        j = i + 1
        while j < len(pairs) and pairs[j][0] == pairs[j - 1][0] + 1 and pairs[j][1] == pairs[j - 1][1] + 1:
            j += 1
        (s0, d0), n = pairs[i], j - i
        dst[d0:d0 + n].copy_(src[s0:s0 + n], non_blocking=True)
        i = j


def copy_blocks_triton(
    src: torch.Tensor,       # [NBs, ...] one layer's pool: CUDA or pinned host
    dst: torch.Tensor,       # [NBd, ...] one layer's pool: CUDA or pinned host (at least one side CUDA)
    src_ids: torch.Tensor,   # [N] int64, any device (a CUDA tensor avoids a host->device copy)
    dst_ids: torch.Tensor,   # [N] int64
) -> None:
    gpu = src if src.is_cuda else dst
    if not gpu.is_cuda:
        raise ValueError("copy_blocks_triton needs one CUDA side")
    other = dst if gpu is src else src
    mappable = other.is_cuda and other.device == gpu.device or (not other.is_cuda and other.is_pinned())
    if not mappable:
        # Pageable host memory (or another GPU): the driver stages it; runs of blocks at least batch.
        copy_blocks_runs(src, dst, src_ids.cpu(), dst_ids.cpu())
        return
    with torch.cuda.device(gpu.device):
        launch_copy_kernel(src, dst, src_ids.to(gpu.device, non_blocking=True),
                           dst_ids.to(gpu.device, non_blocking=True))
