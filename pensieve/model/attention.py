"""The attention layer of every model: store the new K/V into the paged cache, then attend."""
from __future__ import annotations

import torch
from torch import nn

from pensieve.kernels import paged_attention, store_kv
from pensieve.kernels.metadata import AttentionMetadata


class PagedAttention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float, layer_idx: int):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = scale
        self.layer_idx = layer_idx

    def forward(
        self,
        q: torch.Tensor,          # [T, num_heads * head_dim]
        k: torch.Tensor,          # [T, num_kv_heads * head_dim]
        v: torch.Tensor,          # [T, num_kv_heads * head_dim]
        kv_cache: torch.Tensor,   # [num_blocks, 2, block_size, num_kv_heads, head_dim]
        meta: AttentionMetadata,
    ) -> torch.Tensor:            # [T, num_heads * head_dim]
        T = q.shape[0]
        q = q.view(T, self.num_heads, self.head_dim)
        k = k.view(T, self.num_kv_heads, self.head_dim)
        v = v.view(T, self.num_kv_heads, self.head_dim)
        # New tokens go to blocks the scheduler allocated fresh, never to blocks
        # being swapped in, so the store need not wait for the copy stream.
        store_kv(k, v, kv_cache, meta.slot_mapping)
        if meta.wait_for_layer is not None:
            meta.wait_for_layer(self.layer_idx)
        out = paged_attention(q, kv_cache, meta, self.scale, k, v)
        return out.view(T, self.num_heads * self.head_dim)
