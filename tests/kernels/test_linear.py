"""The small-batch linear kernel (CPU interpreter, or CUDA when present) against x W^T + b in float32."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pensieve.kernels import SmallLinearWorkspace, use_small_batch_linear
from pensieve.kernels.linear import (
    SHARED_MEMORY_BYTES, SmallLinearConfig, choose_small_linear, default_launch, small_batch_linear,
)
from pensieve.model.layers import Linear

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# (the CPU interpreter has no bfloat16 arithmetic: float16 stands in for it there, as in the other kernel tests)
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


@pytest.mark.parametrize("rows,n,k", [(1, 48, 64), (5, 100, 200), (16, 64, 512)])
@pytest.mark.parametrize("config", [
    SmallLinearConfig(block_n=16, block_k=32, split_k=1, swap_ab=True),
    SmallLinearConfig(block_n=16, block_k=32, split_k=3, swap_ab=False),   # K ranges of uneven length
    SmallLinearConfig(block_n=32, block_k=64, split_k=2, swap_ab=True),
], ids=["whole-k", "split3", "split2-swap"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_matches_float32_reference_deterministically(rows, n, k, config, dtype) -> None:
    gen = torch.Generator().manual_seed(rows * n + k)
    x = torch.randn((rows, k), generator=gen).to(dtype)
    w = torch.randn((n, k), generator=gen).to(dtype)
    b = torch.randn((n,), generator=gen).to(dtype)
    ref = x.double() @ w.double().T + b.double()
    work = SmallLinearWorkspace()
    xd, wd, bd = x.to(DEVICE), w.to(DEVICE), b.to(DEVICE)
    first = small_batch_linear(xd, wd, bd, work, config)
    again = small_batch_linear(xd, wd, bd, work, config)
    assert first.dtype == dtype and first.shape == (rows, n)
    scale = ref.abs().max().item()
    assert (first.double().cpu() - ref).abs().max().item() <= TOL[dtype] * scale
    # a fixed summation order: the same bits every call, and the split counters back at zero for the next
    assert torch.equal(first, again)
    if work.counters is not None:
        assert int(work.counters.abs().sum()) == 0
    no_bias = small_batch_linear(xd, wd, None, work, config)
    assert (no_bias.double().cpu() - (x.double() @ w.double().T)).abs().max().item() <= TOL[dtype] * scale


def test_rows_do_not_depend_on_the_batch() -> None:
    """A row's output is the same whatever other rows share the launch (batch invariance)."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn((9, 128), generator=gen).to(DEVICE)
    w = torch.randn((40, 128), generator=gen).to(DEVICE)
    cfg = SmallLinearConfig(block_n=16, block_k=32, split_k=2)
    work = SmallLinearWorkspace()
    full = small_batch_linear(x, w, None, work, cfg)
    assert torch.equal(small_batch_linear(x[3:4], w, None, work, cfg), full[3:4])
    assert torch.equal(small_batch_linear(x[:2], w, None, work, cfg), full[:2])


@pytest.mark.parametrize("rows", [17, 40, 64])
def test_wider_row_tiles_match_the_reference(rows: int) -> None:
    """32- and 64-row programs (batches of 17-64 rows), split and not."""
    gen = torch.Generator().manual_seed(rows)
    x = torch.randn((rows, 96), generator=gen)
    w = torch.randn((80, 96), generator=gen)
    ref = x.double() @ w.double().T
    for split in (1, 2):
        cfg = SmallLinearConfig(block_n=16, block_k=32, split_k=split)
        out = small_batch_linear(x.to(DEVICE), w.to(DEVICE), None, SmallLinearWorkspace(), cfg).cpu()
        assert (out.double() - ref).abs().max().item() <= 1e-5 * ref.abs().max().item()


def test_split_only_for_outputs_too_narrow_to_fill_the_gpu() -> None:
    assert choose_small_linear(28672, 4096, 132).split_k == 1      # gate_up: 448 row tiles
    assert choose_small_linear(4096, 14336, 132).split_k == 1      # down_proj: 64 row tiles streamed at 90% unsplit
    narrow = choose_small_linear(896, 4864, 132)                     # a 0.5B model's down_proj: 14 row tiles
    assert narrow.split_k == 4
    assert 4864 // (narrow.split_k * narrow.block_k) >= 2            # every range keeps >= 2 loop steps
    assert choose_small_linear(64, 256, 132).split_k == 1            # too little K to split


def test_every_default_launch_fits_shared_memory() -> None:
    """64-row programs of the default tiles take 3 stages, not 4 (whose 256 KB of shared memory fail to launch on
    the H100)."""
    for block_m in (16, 32, 64):
        for elem in (2, 4):
            cfg = default_launch(4096, 4096, block_m, elem, 132)
            assert (cfg.block_n + block_m) * cfg.block_k * elem * cfg.num_stages <= SHARED_MEMORY_BYTES
    assert default_launch(4096, 4096, 16, 2, 132).num_stages == 4
    assert default_launch(4096, 4096, 64, 2, 132).num_stages == 3


def test_linear_dispatch_only_for_decode_sized_half_inputs_on_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    assert not use_small_batch_linear(torch.zeros(4, 8, dtype=torch.float16))         # CPU: cuBLAS/ATen
    if torch.cuda.is_available():
        assert use_small_batch_linear(torch.zeros(32, 8, dtype=torch.bfloat16, device="cuda"))
        assert not use_small_batch_linear(torch.zeros(33, 8, dtype=torch.bfloat16, device="cuda"))  # cuBLAS leads
        assert not use_small_batch_linear(torch.zeros(4, 8, device="cuda"))              # float32: exact path
        monkeypatch.setenv("PENSIEVE_SMALL_BATCH_LINEAR", "0")
        assert not use_small_batch_linear(torch.zeros(4, 8, dtype=torch.bfloat16, device="cuda"))


@pytest.mark.gpu
@pytest.mark.parametrize("n,k", [(4096, 4096), (6144, 4096), (5120, 13824)])
def test_cuda_layer_matches_cublas_and_replays_in_a_graph(n: int, k: int) -> None:
    """Model-sized shapes through Linear.forward (the kernel for <= 32 rows, cuBLAS above), eager and
    replayed from a CUDA graph with new inputs: within bf16 rounding of F.linear."""
    torch.manual_seed(0)
    layer = Linear(k, n, True, torch.bfloat16).cuda()
    layer.weight.data.normal_(0, 0.02)
    layer.bias.data.normal_(0, 0.02)
    for rows in (1, 7, 16, 17, 32, 33):
        x = torch.randn((rows, k), dtype=torch.bfloat16, device="cuda")
        ref = F.linear(x.float(), layer.weight.float(), layer.bias.float())
        out = layer(x)
        assert (out.float() - ref).abs().max().item() <= 2e-2 * ref.abs().max().item()
    # batch invariance up to 32 rows: a row's output does not depend on the batch it decodes in
    x = torch.randn((32, k), dtype=torch.bfloat16, device="cuda")
    full = layer(x)
    for rows in (1, 9, 17):
        assert torch.equal(layer(x[:rows]), full[:rows])
    x = torch.randn((8, k), dtype=torch.bfloat16, device="cuda")
    layer(x)  # compiled outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = layer(x)
    for _ in range(3):
        x.copy_(torch.randn_like(x))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, layer(x))
