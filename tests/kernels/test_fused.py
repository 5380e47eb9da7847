"""Fused decoder-layer kernels (CPU interpreter, or CUDA when present) vs the PyTorch layers they replace."""
from __future__ import annotations

import pytest
import torch

from pensieve.kernels.fused import add_rms_norm, rotary_inplace, silu_and_mul_triton
from pensieve.model.layers import RMSNorm, Rope, RotaryEmbedding, apply_rotary, silu_and_mul
from tests.kernels.helpers import run_kernel

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


@pytest.mark.parametrize("head_dim,dtype", [(64, torch.float32), (80, torch.float32), (32, torch.float16)])
def test_rotary_matches_reference_on_a_strided_qkv_view(head_dim: int, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    T, hq, hkv = 5, 4, 2
    rope = RotaryEmbedding(head_dim, 4096, 10000.0, None)
    positions = torch.tensor([0, 3, 17, 18, 4000])  # non-contiguous, as recompute + new turn gives
    qkv = torch.randn((T, (hq + 2 * hkv) * head_dim), generator=gen).to(dtype)
    qk = qkv[:, : (hq + hkv) * head_dim].view(T, hq + hkv, head_dim)  # row stride covers V too
    ref_rope = rope(positions)
    assert ref_rope.cos is not None  # the PyTorch path on the CPU
    expected = apply_rotary(qk.clone(), ref_rope)
    v_before = qkv[:, (hq + hkv) * head_dim:].clone()
    # rotate through the view (in place): on CUDA move the whole qkv buffer and view it there
    work = qkv.cuda() if torch.cuda.is_available() else qkv
    view = work[:, : (hq + hkv) * head_dim].view(T, hq + hkv, head_dim)
    table = rope.cos_sin.to(work.device)
    out = rotary_inplace(view, table, positions.to(work.device))
    assert out.data_ptr() == view.data_ptr()
    got = out.cpu()
    torch.testing.assert_close(got.float(), expected.float(), atol=TOL[dtype], rtol=TOL[dtype])
    assert torch.equal(work[:, (hq + hkv) * head_dim:].cpu(), v_before)  # V untouched


def test_rotary_dispatch_uses_the_table_on_the_fused_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PENSIEVE_ATTENTION_BACKEND", "triton")
    rope = RotaryEmbedding(16, 64, 10000.0, None)
    r = rope(torch.tensor([1, 2]))
    assert isinstance(r, Rope) and r.cos is None and r.table is rope.cos_sin


@pytest.mark.parametrize("dim,dtype", [(96, torch.float32), (64, torch.float16)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_add_rms_norm_matches_reference(dim: int, dtype: torch.dtype, with_residual: bool) -> None:
    gen = torch.Generator().manual_seed(1)
    norm = RMSNorm(dim, 1e-6, dtype)
    norm.weight.data = torch.randn(dim, generator=gen).to(dtype)
    x = torch.randn((7, dim), generator=gen).to(dtype)
    residual = torch.randn((7, dim), generator=gen).to(dtype) if with_residual else None
    expected = norm(x, residual)
    out, summed = run_kernel(add_rms_norm, x, residual, norm.weight, 1e-6)
    if with_residual:
        exp_out, exp_sum = expected
        torch.testing.assert_close(summed.cpu(), exp_sum, atol=0, rtol=0)  # the same rounded sum
    else:
        exp_out = expected
        assert summed is None
    torch.testing.assert_close(out.cpu().float(), exp_out.float(), atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("inter,dtype", [(1500, torch.float32), (48, torch.float16)])
def test_silu_and_mul_matches_reference(inter: int, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(2)
    x = torch.randn((3, 2 * inter), generator=gen).to(dtype)
    expected = silu_and_mul(x)
    got = run_kernel(silu_and_mul_triton, x)
    torch.testing.assert_close(got.float(), expected.float(), atol=TOL[dtype], rtol=TOL[dtype])


def test_llama_forward_with_fused_kernels_matches_reference(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """The whole decoder (tiny Llama, float32) through the fused kernels and the Triton attention, against
    the PyTorch path: the same logits within float32 rounding."""
    from pensieve import LLM, SamplingParams
    from pensieve.model.random_checkpoint import make_random_checkpoint

    path = make_random_checkpoint(tmp_path / "llama", "llama", size="tiny", dtype=torch.float32, seed=0)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=1)
    prompts = [{"prompt_token_ids": [5, 9, 13, 2, 7]}, {"prompt_token_ids": [11, 3]}]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    runs = {}
    for backend in ("reference", "triton"):
        monkeypatch.setenv("PENSIEVE_ATTENTION_BACKEND", backend)
        llm = LLM(str(path), device=device, dtype="float32", enforce_eager=True, num_gpu_blocks=32)
        runs[backend] = llm.generate(prompts, params)
        del llm
    for ref, fused in zip(runs["reference"], runs["triton"]):
        assert ref.outputs[0].token_ids == fused.outputs[0].token_ids
        for (lp_ref, _), (lp_fused, _) in zip(ref.outputs[0].logprobs, fused.outputs[0].logprobs):
            assert abs(lp_ref - lp_fused) < 1e-4


def test_fused_kernels_can_be_switched_off(monkeypatch: pytest.MonkeyPatch) -> None:
    from pensieve.kernels import use_fused_kernels

    monkeypatch.setenv("PENSIEVE_ATTENTION_BACKEND", "triton")
    t = torch.zeros(1)
    assert use_fused_kernels(t)
    monkeypatch.setenv("PENSIEVE_FUSED_KERNELS", "0")
    assert not use_fused_kernels(t)
