"""Block copy: the gather kernel (CPU interpreter), the coalesced-runs fallback, the dispatch."""
from __future__ import annotations

import pytest
import torch

from pensieve.kernels import copy_blocks
from pensieve.kernels.block_copy import copy_blocks_runs, launch_copy_kernel
from pensieve.kernels.reference import copy_blocks_reference
from tests.kernels.helpers import run_kernel

SHAPE = (2, 4, 2, 24)  # [2, block_size, Hkv, D]: 384 elements per block


def _pools(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return torch.randn((9, *SHAPE), generator=gen).to(dtype), torch.randn((7, *SHAPE), generator=gen).to(dtype)


IDS = (torch.tensor([3, 4, 5, 0, 8, 1]), torch.tensor([0, 1, 2, 6, 3, 5]))  # a run of 3, then scattered


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_copy_kernel_matches_reference(dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    src, dst = _pools(dtype)
    expected = dst.clone()
    copy_blocks_reference(src, expected, *IDS)
    run_kernel(launch_copy_kernel, src, dst, *IDS, inplace=(1,))
    assert torch.equal(dst, expected)
    # Small chunks: a block row is split over several programs, the last one partly masked.
    import pensieve.kernels.block_copy as bc

    monkeypatch.setattr(bc, "_CHUNK_BYTES", 256 * dtype.itemsize)
    src, dst = _pools(dtype)
    run_kernel(launch_copy_kernel, src, dst, IDS[0].to(torch.int32), IDS[1].to(torch.int32), inplace=(1,))
    assert torch.equal(dst, expected)


def test_copy_kernel_on_a_layer_view_of_a_multi_layer_pool() -> None:
    pool = torch.randn((3, 9, *SHAPE))          # [layers, NB, ...]: each layer is a view
    host = torch.zeros((3, 7, *SHAPE))
    layer = host[2]
    run_kernel(launch_copy_kernel, pool[1], layer, *IDS, inplace=(1,))
    assert torch.equal(host[2][IDS[1]], pool[1][IDS[0]])
    assert host[:2].abs().sum() == 0 and host[2][[4]].abs().sum() == 0


def test_runs_fallback_matches_reference() -> None:
    src, dst = _pools(torch.float32)
    expected = dst.clone()
    copy_blocks_reference(src, expected, *IDS)
    copy_blocks_runs(src, dst, *IDS)
    assert torch.equal(dst, expected)


def test_dispatch_cpu_to_cpu_uses_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PENSIEVE_ATTENTION_BACKEND", "triton")
    src, dst = _pools(torch.float32)
    expected = dst.clone()
    copy_blocks_reference(src, expected, *IDS)
    copy_blocks(src, dst, *IDS)
    assert torch.equal(dst, expected)


@pytest.mark.gpu
@pytest.mark.parametrize("direction", ["h2d", "d2h", "d2d"])
def test_copy_blocks_uva_on_gpu(direction: str) -> None:
    src, dst = _pools(torch.bfloat16)
    expected = dst.clone()
    copy_blocks_reference(src, expected, *IDS)
    if direction in ("h2d", "d2d"):
        src = src.pin_memory() if direction == "h2d" else src.cuda()
        dst = dst.cuda()
    else:
        src, dst = src.cuda(), dst.pin_memory()
    copy_blocks(src, dst, IDS[0].cuda(), IDS[1].cuda())
    torch.cuda.synchronize()
    assert torch.equal(dst.cpu(), expected)
