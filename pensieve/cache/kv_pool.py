"""The KV tensors of both tiers, laid out so that one layer's blocks move on their own.

Each tier is one tensor [num_layers, num_blocks, 2, block_size, num_kv_heads, head_dim];
tier[l] is layer l's contiguous pool and tier[l][b] one block's K and V, so a
swap moves whole (layer, block) rows and can be pipelined layer by layer.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class KVSpecLike:
    num_layers: int
    num_kv_heads: int
    head_dim: int


def block_bytes(spec: KVSpecLike, block_size: int, dtype: torch.dtype) -> int:
    """Bytes of one block across all layers (K and V)."""
    elem = torch.empty((), dtype=dtype).element_size()
    return spec.num_layers * 2 * block_size * spec.num_kv_heads * spec.head_dim * elem


def default_cpu_cache_bytes() -> int:
    """The most the CPU tier takes by default: 40% of available host memory, at most 64 GB
    (the runner also caps it at twice the GPU tier; --kv-offloading-size sets any size)."""
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
        avail = info.get("MemAvailable", info.get("MemFree", 0))
    except OSError:
        avail = 8 << 30
    return int(min(0.4 * avail, 64e9))


def allocate_tier(spec: KVSpecLike, num_blocks: int, block_size: int, dtype: torch.dtype,
                  device: torch.device, pin: bool = False) -> torch.Tensor:
    shape = (spec.num_layers, num_blocks, 2, block_size, spec.num_kv_heads, spec.head_dim)
    if num_blocks == 0:
        return torch.empty(shape, dtype=dtype, device=device)
    if pin:
        return torch.empty(shape, dtype=dtype, pin_memory=True)
    # zeros, not empty: an unwritten slot must never hold NaNs that a masked-out lane could still read
    return torch.zeros(shape, dtype=dtype, device=device)
