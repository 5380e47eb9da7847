"""Our models on CUDA (Triton kernels) against HF on the CPU, bf16, and decode under a CUDA graph."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from pensieve.model.loader import load_model
from tests.model.paged import PagedSeqs

pytestmark = pytest.mark.gpu


def _tokens(config, n: int, seed: int) -> list[int]:
    return torch.randint(5, config.vocab_size, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _hf_logits(hf, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].float()


@pytest.mark.parametrize("variant", ["llama", "llama3-rope", "qwen3", "opt"])
def test_cuda_fp32_matches_hf(tiny_checkpoint, model_pair, variant):
    hf, _, config = model_pair(variant)
    model, _, _ = load_model(tiny_checkpoint(variant), "float32", "cuda")
    a, b = _tokens(config, 12, 0), _tokens(config, 9, 1)
    paged = PagedSeqs(model, config)
    paged.step([(0, a[:7], None)])
    got_a, got_b = paged.step([(0, a[7:], None), (1, b, None)])
    # Triton's fp32 dot may run in tf32 on the GPU.
    torch.testing.assert_close(got_a.cpu(), _hf_logits(hf, a)[7:], atol=5e-3, rtol=0)
    torch.testing.assert_close(got_b.cpu(), _hf_logits(hf, b), atol=5e-3, rtol=0)


def test_cuda_bf16_close_to_fp32(tiny_checkpoint, model_pair):
    hf, _, config = model_pair("qwen2")
    model, _, dtype = load_model(tiny_checkpoint("qwen2"), "bfloat16", "cuda")
    assert dtype == torch.bfloat16
    ids = _tokens(config, 20, 2)
    [got] = PagedSeqs(model, config).step([(0, ids, None)])
    want = _hf_logits(hf, ids)
    assert got.dtype == torch.float32
    assert (got.cpu() - want).abs().max() < 0.05 * want.abs().max()


def test_decode_step_in_cuda_graph(tiny_checkpoint, model_pair):
    _, _, config = model_pair("llama")
    model, _, _ = load_model(tiny_checkpoint("llama"), "float32", "cuda")
    paged = PagedSeqs(model, config)
    prompts = [_tokens(config, 9, 3), _tokens(config, 5, 4)]
    logits = paged.step([(i, p, None) for i, p in enumerate(prompts)])
    last = [int(l[-1].argmax()) for l in logits]

    width = 16  # static block-table width: an upper bound for the test's sequences
    ids, meta = paged.prepare([(i, [t], None) for i, t in enumerate(last)])
    static_ids = ids.clone()
    static = dataclasses.replace(
        meta,
        positions=meta.positions.clone(), query_start_loc=meta.query_start_loc.clone(),
        seq_lens=meta.seq_lens.clone(), slot_mapping=meta.slot_mapping.clone(),
        block_tables=torch.zeros(2, width, dtype=torch.int32, device="cuda"),
        max_seq_len=width * paged.block_size,
    )
    static.block_tables[:, : meta.block_tables.shape[1]] = meta.block_tables

    def run() -> torch.Tensor:
        return model.compute_logits(model(static_ids, static.positions, paged.kv_caches, static))

    with torch.inference_mode():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            run()  # warm-up (Triton compiles) outside the capture
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = run()
        for _ in range(4):  # each step: fill the static inputs, replay, compare with eager
            eager = model.compute_logits(model(ids, meta.positions, paged.kv_caches, meta))
            static_ids.copy_(ids)
            for name in ("positions", "query_start_loc", "seq_lens", "slot_mapping"):
                getattr(static, name).copy_(getattr(meta, name))
            static.block_tables.zero_()
            static.block_tables[:, : meta.block_tables.shape[1]] = meta.block_tables
            graph.replay()
            torch.testing.assert_close(out, eager, atol=1e-3, rtol=0)
            nxt = out.argmax(-1).tolist()
            ids, meta = paged.prepare([(i, [t], None) for i, t in enumerate(nxt)])
