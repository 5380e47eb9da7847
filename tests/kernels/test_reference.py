"""The CPU attention path (scaled_dot_product_attention over the paged cache) against the reference oracle."""
from __future__ import annotations

import pytest
import torch

from pensieve.kernels.reference import paged_attention_reference, paged_attention_sdpa
from tests.kernels.helpers import default_scale, dense_attention, make_batch, random_cache, random_q

BLOCK_SIZE = 16
NUM_BLOCKS = 32
MIXED = [
    (40, [39]),                                   # decode over 2+ blocks
    (20, list(range(20))),                        # prefill, no context
    (61, list(range(16)) + list(range(48, 61))),  # recomputed prefix + new turn around a cached middle
    (35, list(range(30, 35))),                    # new turn over cached context
    (1, [0]),                                     # one-token prompt
]
DECODE = [(40, [39]), (1, [0]), (97, [96]), (16, [15]), (17, [16])]  # ragged lengths, block edges


@pytest.mark.parametrize("seqs", [MIXED, DECODE], ids=["mixed", "decode-only"])
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim,dtype", [
    (9, 3, 64, torch.float32),    # the demo model's GQA 3:1
    (8, 8, 32, torch.float32),    # MHA
    (5, 1, 32, torch.float32),    # GQA 5:1
    (8, 2, 64, torch.float16),
])
def test_sdpa_path_matches_reference(seqs, num_heads, num_kv_heads, head_dim, dtype) -> None:
    meta = make_batch(seqs, BLOCK_SIZE, NUM_BLOCKS)
    assert meta.decode_only == (seqs is DECODE)
    cache = random_cache(NUM_BLOCKS, BLOCK_SIZE, num_kv_heads, head_dim, dtype)
    q = random_q(meta.positions.shape[0], num_heads, head_dim, dtype)
    scale = default_scale(head_dim)
    out = paged_attention_sdpa(q, cache, meta, scale)
    assert out.dtype == q.dtype and out.shape == q.shape
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(out.float(), paged_attention_reference(q, cache, meta, scale).float(), atol=tol, rtol=tol)
    torch.testing.assert_close(out.float(), dense_attention(q, cache, meta, scale), atol=tol, rtol=tol)
