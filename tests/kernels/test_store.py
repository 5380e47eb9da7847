"""Triton KV store (CPU interpreter) vs the reference."""
from __future__ import annotations

import pytest
import torch

from pensieve.kernels import store_kv
from pensieve.kernels.reference import store_kv_reference
from pensieve.kernels.store import store_kv_triton
from tests.kernels.helpers import run_kernel


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.float16])
def test_store_matches_reference_and_skips_negative_slots(cache_dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    num_blocks, block_size, num_kv, head_dim, T = 6, 16, 2, 48, 7
    # K and V as column slices of one fused projection output: strided, as the model produces them.
    qkv = torch.randn((T, 3 * num_kv * head_dim), generator=gen)
    k = qkv[:, num_kv * head_dim: 2 * num_kv * head_dim].view(T, num_kv, head_dim)
    v = qkv[:, 2 * num_kv * head_dim:].view(T, num_kv, head_dim)
    slots = torch.tensor([5, -1, 17, 95, -1, 40, 31], dtype=torch.int64)  # crosses blocks; two skipped
    cache = torch.randn((num_blocks, 2, block_size, num_kv, head_dim), generator=gen).to(cache_dtype)
    expected = cache.clone()
    store_kv_reference(k, v, expected, slots)
    before = cache.clone()
    run_kernel(store_kv_triton, k, v, cache, slots, inplace=(2,))
    assert torch.equal(cache, expected)
    # Every slot other than the stored ones is untouched.
    touched = torch.zeros(num_blocks * block_size, dtype=torch.bool)
    touched[slots[slots >= 0]] = True
    flat = lambda c: c.permute(0, 2, 1, 3, 4).reshape(num_blocks * block_size, -1)  # noqa: E731
    assert torch.equal(flat(cache)[~touched], flat(before)[~touched])
    assert torch.equal(flat(cache)[5].view(2, num_kv, head_dim)[0], k[0].to(cache_dtype))


def test_store_dispatch_forced_triton(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PENSIEVE_ATTENTION_BACKEND", "triton")
    k = torch.randn(3, 1, 16)
    v = torch.randn(3, 1, 16)
    cache = torch.zeros(2, 2, 4, 1, 16)
    run_kernel(store_kv, k, v, cache, torch.tensor([7, 0, -1]), inplace=(2,))
    assert torch.equal(cache[1, 0, 3, 0], k[0, 0]) and torch.equal(cache[0, 1, 0, 0], v[1, 0])
    assert int((cache.abs().sum(-1) != 0).sum()) == 4  # two tokens x (K, V); the skipped one wrote nothing
