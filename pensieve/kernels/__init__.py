"""Kernels: paged attention, KV store, block copy, the decoder layer's fused elementwise ops
(rotary, residual add + RMSNorm, SiLU-and-mul: `fused.py`) and the small-batch linear (`linear.py`),
the last two dispatched from pensieve.model.layers.

Each op dispatches to a Triton kernel on CUDA tensors and to PyTorch
elsewhere (kernels/reference.py) (set PENSIEVE_ATTENTION_BACKEND=triton to run the Triton
kernels on the CPU under TRITON_INTERPRET=1, as the tests do).

Contract (see kernels/metadata.py for the batch layout):
  paged_attention(q [T, Hq, D], kv_cache [NB, 2, bs, Hkv, D], meta, scale, k=None, v=None) -> [T, Hq, D]
      query t of sequence b at position p attends to KV positions j <= p, j < seq_lens[b],
      read through block_tables[b]; GQA when Hq is a multiple of Hkv. k, v [T, Hkv, D]: the new
      tokens' K/V, equal to what store_kv just wrote; the kernel may read them there instead.
  store_kv(k [T, Hkv, D], v [T, Hkv, D], kv_cache, slot_mapping [T]) -> None
      kv_cache[slot // bs, 0, slot % bs] = k; ... [.., 1, ..] = v; slots < 0 are skipped.
  copy_blocks(src [NBs, ...], dst [NBd, ...], src_ids [N], dst_ids [N]) -> None
      dst[dst_ids[i]] = src[src_ids[i]] for one layer; src/dst may be pinned host and device.
"""
from __future__ import annotations

import functools
import os

import torch

from pensieve.kernels.metadata import AttentionMetadata
from pensieve.kernels.reference import copy_blocks_reference, paged_attention_sdpa, store_kv_reference


def _use_triton(t: torch.Tensor) -> bool:
    backend = os.environ.get("PENSIEVE_ATTENTION_BACKEND", "auto")
    if backend == "auto":
        return t.is_cuda
    return backend == "triton"


def use_fused_kernels(t: torch.Tensor) -> bool:
    """The decoder layer's fused Triton kernels (rotary, add + RMSNorm, SiLU-and-mul) for this tensor.
    PENSIEVE_FUSED_KERNELS=0 keeps the PyTorch ops (the benchmark's A/B of the fusion)."""
    return _use_triton(t) and os.environ.get("PENSIEVE_FUSED_KERNELS", "1") != "0"


@functools.lru_cache(maxsize=8)
def num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def device_sms(t: torch.Tensor) -> int:
    """Streaming multiprocessors of the GPU holding t (launch heuristics size grids by them)."""
    return num_sms(t.device.index if t.device.index is not None else torch.cuda.current_device())


# Up to 32 rows the small-batch kernel beats cuBLAS on every 8B/13B weight shape on the H100; at 64 rows
# cuBLAS is faster on most (benchmarks/results/kernels/linear-835ab1c/linear_sweep.md).
SMALL_BATCH_MAX_ROWS = 32


class SmallLinearWorkspace:
    """The small-batch kernel's split-K partials and per-tile counters for one weight, owned by the layer
    that holds the weight and allocated on first use. Every call leaves the counters at zero, so the
    buffers are reused as they are."""

    def __init__(self) -> None:
        self.partials: torch.Tensor | None = None
        self.counters: torch.Tensor | None = None

    def get(self, parts: int, tiles: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if self.partials is None or self.partials.numel() < parts or self.partials.device != device:
            self.partials = torch.empty(parts, dtype=torch.float32, device=device)
        if self.counters is None or self.counters.numel() < tiles or self.counters.device != device:
            self.counters = torch.zeros(tiles, dtype=torch.int32, device=device)
        return self.partials, self.counters


def small_batch_linear_enabled() -> bool:
    """PENSIEVE_SMALL_BATCH_LINEAR=0 keeps cuBLAS for every linear (the benchmark's A/B)."""
    return os.environ.get("PENSIEVE_SMALL_BATCH_LINEAR", "1") != "0"


def use_small_batch_linear(x: torch.Tensor) -> bool:
    """The small-batch linear kernel (kernels/linear.py) for a decode-sized half-precision input on CUDA."""
    return (x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and x.dim() == 2
            and x.shape[0] <= SMALL_BATCH_MAX_ROWS and x.stride(1) == 1 and small_batch_linear_enabled())


# The Triton modules are imported on first use: @triton.jit fixes interpreter mode when it runs,
# so importing them here would freeze it before a test or the runner sets TRITON_INTERPRET.


def paged_attention(q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata, scale: float,
                    k: torch.Tensor | None = None, v: torch.Tensor | None = None) -> torch.Tensor:
    if _use_triton(q):
        from pensieve.kernels.attention import paged_attention_triton

        return paged_attention_triton(q, kv_cache, meta, scale, k=k, v=v)
    return paged_attention_sdpa(q, kv_cache, meta, scale)


def store_kv(k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    if _use_triton(k):
        from pensieve.kernels.store import store_kv_triton

        store_kv_triton(k, v, kv_cache, slot_mapping)
        return
    store_kv_reference(k, v, kv_cache, slot_mapping)


def copy_blocks(src: torch.Tensor, dst: torch.Tensor, src_ids: torch.Tensor, dst_ids: torch.Tensor) -> None:
    # The kernel needs a CUDA side (the other may be pinned host memory, mapped through UVA);
    # CPU<->CPU copies always use the reference.
    gpu_side = src if src.is_cuda else dst
    if gpu_side.is_cuda and _use_triton(gpu_side):
        from pensieve.kernels.block_copy import copy_blocks_triton

        copy_blocks_triton(src, dst, src_ids, dst_ids)
        return
    copy_blocks_reference(src, dst, src_ids, dst_ids)
