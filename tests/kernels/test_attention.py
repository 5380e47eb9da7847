"""Triton paged attention (CPU interpreter) vs the PyTorch reference and a dense float64 oracle."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from pensieve.kernels import paged_attention
from pensieve.kernels.attention import LaunchConfig, choose_config, paged_attention_triton
from pensieve.kernels.reference import paged_attention_reference
from tests.kernels.helpers import (default_scale, dense_attention, make_batch, random_cache, random_q,
                                  run_kernel, to_kernel_device)

# The interpreter converts 0-d arrays to ints in loop bounds (a NumPy deprecation, harmless here).
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

BLOCK_SIZE = 16
NUM_BLOCKS = 24
TOL = {torch.float32: 1e-4, torch.float16: 3e-3}

def triton_attention(q, cache, meta, scale, config=None) -> torch.Tensor:
    return run_kernel(paged_attention_triton, q, cache, meta, scale, config=config)


# One ragged batch holding every shape of work the engine sends in one step.
MIXED = [
    (40, [39]),                                   # decode with 39 cached tokens (crosses 2 blocks)
    (20, list(range(20))),                        # pure prefill, no context
    (61, list(range(16)) + list(range(48, 61))),  # recompute: dropped prefix 0..15 + new turn 48..60, 16..47 cached
    (35, list(range(30, 35))),                    # chunked prefill / new turn over 30 cached tokens
    (1, [0]),                                     # a one-token prompt
]


def _check(out: torch.Tensor, q, cache, meta, scale, dtype) -> None:
    ref = paged_attention_reference(q, cache, meta, scale).float()
    dense = dense_attention(q, cache, meta, scale)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert torch.isfinite(out.float()).all()
    torch.testing.assert_close(out.float(), ref, atol=TOL[dtype], rtol=TOL[dtype])
    torch.testing.assert_close(out.float(), dense, atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize(
    "num_heads,num_kv_heads,head_dim,dtype",
    [
        (8, 2, 64, torch.float32),   # GQA 4:1
        (8, 8, 32, torch.float16),   # MHA
        (8, 1, 32, torch.float32),   # GQA 8:1
        (4, 2, 80, torch.float16),   # non power-of-two head_dim (padded + masked)
    ],
)
def test_mixed_ragged_batch(num_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> None:
    meta = make_batch(MIXED, BLOCK_SIZE, NUM_BLOCKS)
    cache = random_cache(NUM_BLOCKS, BLOCK_SIZE, num_kv_heads, head_dim, dtype)
    q = random_q(meta.positions.shape[0], num_heads, head_dim, dtype)
    scale = default_scale(head_dim)
    _check(triton_attention(q, cache, meta, scale), q, cache, meta, scale, dtype)


@pytest.mark.parametrize("k_nd", [False, True])
def test_multi_tile_queries_and_groups(k_nd: bool) -> None:
    """Small query tiles: one sequence spans several programs (exercises the tile -> sequence search);
    both ways of loading K."""
    meta = make_batch(MIXED, BLOCK_SIZE, NUM_BLOCKS)
    cache = random_cache(NUM_BLOCKS, BLOCK_SIZE, 2, 32, torch.float32)
    q = random_q(meta.positions.shape[0], 4, 32, torch.float32)
    config = LaunchConfig(block_m=16, block_q=8, block_n=16, num_splits=1, num_warps=4, num_stages=1, k_nd=k_nd)
    out = triton_attention(q, cache, meta, 0.2, config=config)
    _check(out, q, cache, meta, 0.2, torch.float32)


@pytest.mark.parametrize("block_size,block_n", [(4, 16), (64, 16), (32, 32)])
def test_pages_smaller_and_larger_than_a_tile(block_size: int, block_n: int) -> None:
    """A tile's page offsets are loop-invariant: a tile spanning several pages, a tile inside one
    page (at an offset that moves with the tile) and one page per tile all read the right KV."""
    num_blocks = 64 if block_size == 4 else 12
    meta = make_batch(MIXED, block_size, num_blocks)
    cache = random_cache(num_blocks, block_size, 2, 32, torch.float32)
    q = random_q(meta.positions.shape[0], 4, 32, torch.float32)
    for k_nd in (False, True):
        config = LaunchConfig(block_m=16, block_q=8, block_n=block_n, num_splits=1, num_warps=4, num_stages=1, k_nd=k_nd)
        _check(triton_attention(q, cache, meta, 0.2, config=config), q, cache, meta, 0.2, torch.float32)


def test_block_size_must_be_a_power_of_two() -> None:
    from pensieve.config import CacheConfig

    assert CacheConfig(block_size=32).block_size == 32
    for bad in (0, 12, 48):
        with pytest.raises(ValueError, match="power of two"):
            CacheConfig(block_size=bad)


def test_register_cap_keeps_answers() -> None:
    """A register cap (the prefill lever for two programs per SM) changes no answer; on a GPU the cap
    is compiled in, and a tight one spills rather than miscomputes."""
    meta = make_batch(MIXED, BLOCK_SIZE, NUM_BLOCKS)
    cache = random_cache(NUM_BLOCKS, BLOCK_SIZE, 2, 32, torch.float16)
    q = random_q(meta.positions.shape[0], 8, 32, torch.float16)
    config = LaunchConfig(block_m=32, block_q=8, block_n=16, num_splits=1, num_warps=4, num_stages=1, maxnreg=64)
    _check(triton_attention(q, cache, meta, 0.2, config=config), q, cache, meta, 0.2, torch.float16)


# Every sequence's new tokens are its suffix (no recomputed prefix apart from a new turn).
SUFFIX = [
    (40, [39]),                                   # decode
    (20, list(range(20))),                        # prefill, no context
    (45, list(range(9, 45))),                     # new turn over 9 cached tokens, several tiles of new rows
    (35, list(range(30, 35))),                    # chunked prefill
    (1, [0]),                                     # a one-token prompt
]


def _new_kv_from_cache(cache: torch.Tensor, meta, head_dim: int, pad_to: int = 0):
    """The new tokens' K/V as the layer holds them: rows of one wider projection (strided views),
    with the values store_kv wrote to their slots."""
    bs = cache.shape[2]
    slots = meta.slot_mapping
    k = cache[slots // bs, 0, slots % bs]                                  # [T, Hkv, D]
    v = cache[slots // bs, 1, slots % bs]
    T, hkv, _ = k.shape
    wide = torch.zeros((T, 2 * hkv + pad_to, head_dim), dtype=cache.dtype)
    wide[:, pad_to:pad_to + hkv], wide[:, pad_to + hkv:] = k, v
    return wide[:, pad_to:pad_to + hkv], wide[:, pad_to + hkv:]


@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim,dtype",
                         [(8, 2, 32, torch.float16), (4, 4, 32, torch.float32), (4, 2, 40, torch.float32)])
def test_new_kv_from_layer_tensors(num_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> None:
    """With the layer's own K/V passed and every new run a suffix, the kernel reads the new tokens'
    K/V from them and gives the reference's answer; query tiles smaller than a sequence put the
    causal diagonal mid-tile and start programs mid-sequence."""
    meta = make_batch(SUFFIX, BLOCK_SIZE, NUM_BLOCKS)
    assert meta.new_tokens_are_suffix
    cache = random_cache(NUM_BLOCKS, BLOCK_SIZE, num_kv_heads, head_dim, dtype)
    q = random_q(meta.positions.shape[0], num_heads, head_dim, dtype)
    k, v = _new_kv_from_cache(cache, meta, head_dim, pad_to=num_heads)
    block_m = max(16, 8 * (num_heads // num_kv_heads))  # every tl.dot side >= 16 on a GPU
    config = LaunchConfig(block_m=block_m, block_q=block_m * num_kv_heads // num_heads, block_n=16, num_splits=1,
                          num_warps=4, num_stages=1)
    out = run_kernel(paged_attention_triton, q, cache, meta, 0.2, config, k, v)
    _check(out, q, cache, meta, 0.2, dtype)
    # the tensors are what the kernel read (the cache holds the true values), and without them it
    # gathers the same answer from the cache
    poisoned = run_kernel(paged_attention_triton, q, cache, meta, 0.2, config, k * 0, v * 0)
    assert not torch.equal(poisoned, out)
    torch.testing.assert_close(run_kernel(paged_attention_triton, q, cache, meta, 0.2, config), out,
                               atol=TOL[dtype], rtol=TOL[dtype])


def test_prefill_without_context_skips_the_cache() -> None:
    """A batch of whole prompts (no sequence has cached context) runs without the paged loops: its
    answer comes from the layer's K/V alone (the cache is poisoned), and equals the reference."""
    meta = make_batch([(20, list(range(20))), (7, list(range(7))), (33, list(range(33))), (1, [0])],
                      BLOCK_SIZE, NUM_BLOCKS)
    assert meta.new_tokens_are_suffix and not meta.has_context
    cache = random_cache(NUM_BLOCKS, BLOCK_SIZE, 2, 32, torch.float32)
    q = random_q(meta.positions.shape[0], 8, 32, torch.float32)
    k, v = _new_kv_from_cache(cache, meta, 32)
    config = LaunchConfig(block_m=32, block_q=8, block_n=16, num_splits=1, num_warps=4, num_stages=1, k_nd=True)
    out = run_kernel(paged_attention_triton, q, cache, meta, 0.2, config, k, v)
    _check(out, q, cache, meta, 0.2, torch.float32)
    poisoned = run_kernel(paged_attention_triton, q, torch.full_like(cache, 1e4), meta, 0.2, config, k, v)
    torch.testing.assert_close(poisoned, out)


def test_new_kv_ignored_unless_suffix() -> None:
    """A batch with a recomputed prefix apart from its new turn reads every position from the
    cache even when K/V are passed: poisoned K/V would otherwise show in the output."""
    meta = make_batch(MIXED, BLOCK_SIZE, NUM_BLOCKS)
    assert not meta.new_tokens_are_suffix
    cache = random_cache(NUM_BLOCKS, BLOCK_SIZE, 2, 32, torch.float32)
    q = random_q(meta.positions.shape[0], 8, 32, torch.float32)
    poison = torch.full((q.shape[0], 2, 32), 1e4)
    out = triton_attention(q, cache, meta, 0.2)
    torch.testing.assert_close(run_kernel(paged_attention_triton, q, cache, meta, 0.2, None, poison, poison), out)
    _check(out, q, cache, meta, 0.2, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_decode_split_kv(dtype: torch.dtype) -> None:
    seqs = [(70, [69]), (1, [0]), (33, [32]), (17, [16])]
    meta = make_batch(seqs, BLOCK_SIZE, NUM_BLOCKS)
    assert meta.decode_only
    cache = random_cache(NUM_BLOCKS, BLOCK_SIZE, 2, 64, dtype)
    q = random_q(len(seqs), 8, 64, dtype)
    scale = default_scale(64)
    # The runner captures decode with max_seq_len = max_model_len: more splits, many of them empty.
    for max_seq_len, splits in [(meta.max_seq_len, None), (4096, 8)]:
        m = dataclasses.replace(meta, max_seq_len=max_seq_len)
        config = None if splits is None else LaunchConfig(16, 1, 32, splits, 4, 1)
        out = triton_attention(q, cache, m, scale, config=config)
        _check(out, q, cache, m, scale, dtype)
    auto = choose_config(len(seqs), 1, meta.max_seq_len, 2, 4, 64, True, on_gpu=False)
    assert auto.num_splits > 1  # the default CPU config does take the split path


def test_decode_without_split_matches_split() -> None:
    seqs = [(50, [49]), (9, [8])]
    meta = make_batch(seqs, BLOCK_SIZE, NUM_BLOCKS)
    cache = random_cache(NUM_BLOCKS, BLOCK_SIZE, 4, 32, torch.float32)
    q = random_q(2, 4, 32, torch.float32)
    one = triton_attention(q, cache, meta, 0.3, config=LaunchConfig(16, 1, 32, 1, 4, 1))
    many = triton_attention(q, cache, meta, 0.3, config=LaunchConfig(16, 1, 16, 3, 4, 1))
    torch.testing.assert_close(one, many, atol=1e-5, rtol=1e-5)
    _check(one, q, cache, meta, 0.3, torch.float32)


def test_padding_sequence_with_no_kv_gives_zeros() -> None:
    """A padded decode slot (seq_len 0, as a graph-captured batch may carry) must not produce NaN."""
    meta = make_batch([(20, [19]), (5, [4])], BLOCK_SIZE, NUM_BLOCKS)
    meta = dataclasses.replace(meta, seq_lens=torch.tensor([20, 0], dtype=torch.int32))
    cache = random_cache(NUM_BLOCKS, BLOCK_SIZE, 2, 32, torch.float32)
    q = random_q(2, 4, 32, torch.float32)
    out = triton_attention(q, cache, meta, 0.2)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    ref = paged_attention_reference(q[:1], cache, make_batch([(20, [19])], BLOCK_SIZE, NUM_BLOCKS), 0.2)
    torch.testing.assert_close(out[:1], ref, atol=1e-5, rtol=1e-5)


def test_sequence_output_independent_of_batch() -> None:
    seqs = MIXED[:4]
    meta = make_batch(seqs, BLOCK_SIZE, NUM_BLOCKS)
    cache = random_cache(NUM_BLOCKS, BLOCK_SIZE, 2, 32, torch.float32)
    q = random_q(meta.positions.shape[0], 8, 32, torch.float32)
    full = triton_attention(q, cache, meta, 0.2)
    lo, hi = int(meta.query_start_loc[2]), int(meta.query_start_loc[3])
    alone = dataclasses.replace(
        meta,
        positions=meta.positions[lo:hi],
        query_start_loc=torch.tensor([0, hi - lo], dtype=torch.int32),
        seq_lens=meta.seq_lens[2:3],
        block_tables=meta.block_tables[2:3],
        slot_mapping=meta.slot_mapping[lo:hi],
        max_query_len=hi - lo,
        max_seq_len=int(meta.seq_lens[2]),
    )
    torch.testing.assert_close(triton_attention(q[lo:hi], cache, alone, 0.2), full[lo:hi], atol=1e-5, rtol=1e-5)


def test_dispatch_uses_triton_when_forced(monkeypatch: pytest.MonkeyPatch) -> None:
    import pensieve.kernels.attention as attention_module

    calls: list[int] = []
    real = attention_module.paged_attention_triton

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(attention_module, "paged_attention_triton", spy)
    meta = to_kernel_device(make_batch([(30, list(range(25, 30)))], BLOCK_SIZE, NUM_BLOCKS))
    cache = to_kernel_device(random_cache(NUM_BLOCKS, BLOCK_SIZE, 2, 32, torch.float32))
    q = to_kernel_device(random_q(5, 4, 32, torch.float32))
    monkeypatch.setenv("PENSIEVE_ATTENTION_BACKEND", "triton")
    out = paged_attention(q, cache, meta, 0.2)
    monkeypatch.setenv("PENSIEVE_ATTENTION_BACKEND", "reference")
    ref = paged_attention(q, cache, meta, 0.2)
    assert calls == [1]
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_gpu_config_tiles_compile_on_h100() -> None:
    """The interpreter accepts any tl.dot size; the H100 needs every side >= 16. Check every GPU config."""
    for group in (1, 2, 4, 5, 8, 16):
        for head_dim in (64, 80, 128, 256):
            for max_q, decode in ((1, True), (1, False), (7, False), (4096, False)):
                c = choose_config(64, max_q, 32768, 8, group, head_dim, decode, on_gpu=True)
                assert c.block_m >= 16 and c.block_n >= 16 and c.block_m % c.block_q == 0
                assert c.block_m >= triton_next_pow2(group) * c.block_q or decode
                assert c.num_splits >= 1 and (c.num_splits == 1 or decode)


def test_gpu_prefill_tiles_follow_the_batch() -> None:
    """A small batch of whole prompts takes 64-row tiles with 3 stages; a large one, or any prefill
    over cached context (prompt_tokens None), the 128-row tiles capped for two programs per SM."""
    from pensieve.kernels.attention import SMALL_PROMPT_WORK

    def pick(tokens):
        return choose_config(4, 1024, 1024, 8, 4, 128, False, on_gpu=True, prompt_tokens=tokens)

    small, large, context = pick(4096), pick(SMALL_PROMPT_WORK // 32), pick(None)
    assert (small.block_m, small.block_q, small.num_warps, small.num_stages, small.maxnreg) == (64, 16, 4, 3, None)
    assert large == context and (context.block_m, context.num_stages, context.maxnreg) == (128, 2, 128)
    # short prompts keep their own small tiles either way
    assert choose_config(4, 8, 8, 8, 4, 128, False, on_gpu=True, prompt_tokens=32).block_m == 32
    # MHA (40 / 40 heads): 64-row tiles up to twice the work, 8192 tokens here but not 16384
    mha = [choose_config(8, 1024, 1024, 40, 1, 128, False, on_gpu=True, prompt_tokens=t).block_m for t in (8192, 16384)]
    assert mha == [64, 128]


def triton_next_pow2(x: int) -> int:
    return 1 << (x - 1).bit_length()


def test_gpu_decode_launches_are_the_warmed_up_ones():
    """Every GPU decode launch choose_config picks is one that warm_up_attention compiles (split count,
    tiles, stages and PDL flags are all compiled in: any other would stall serving on the JIT), for
    GQA and MHA, bf16 and fp32 caches; and the split counts do vary."""
    from pensieve.kernels.attention import DECODE_SPLITS, choose_config, decode_launch

    for num_kv_heads, group, elem_bytes in [(8, 4, 2), (40, 1, 2), (8, 4, 4), (2, 8, 2)]:
        warmed = {decode_launch(s, group, elem_bytes) for s in DECODE_SPLITS}
        seen = set()
        for num_seqs in (1, 2, 3, 5, 8, 13, 64, 256):
            for max_seq_len in (1, 100, 300, 1000, 4096, 5000, 32768, 131072):
                cfg = choose_config(num_seqs, 1, max_seq_len, num_kv_heads, group, 128, True, True,
                                    elem_bytes=elem_bytes)
                assert cfg in warmed, (num_seqs, max_seq_len, cfg)
                seen.add(cfg.num_splits)
        assert len(seen) > 3


@pytest.mark.gpu
def test_warm_up_compiles_every_variant():
    import torch

    from pensieve.kernels.attention import warm_up_attention

    cache = torch.randn(8, 2, 16, 8, 128, dtype=torch.bfloat16, device="cuda")
    assert warm_up_attention(cache, 32, torch.bfloat16) > 7


@pytest.mark.gpu
@pytest.mark.parametrize("splits,pdl_attention", [(1, True), (4, True), (4, False)])
def test_decode_pdl_waits_for_the_kernels_before(splits: int, pdl_attention: bool) -> None:
    """Decode launched as a programmatic dependent (PDL) inside a CUDA graph, right after kernels that
    write its q and its new token's K/V (as the model's layer does): every replay must see the new
    values, and give what the plain launch gives."""
    from pensieve.kernels.store import store_kv_triton

    seqs = [(300, [299]), (77, [76]), (1, [0])]
    meta = to_kernel_device(make_batch(seqs, BLOCK_SIZE, 48))
    cache = to_kernel_device(random_cache(48, BLOCK_SIZE, 2, 128, torch.bfloat16))
    q_src = torch.randn(3, 8, 128, dtype=torch.bfloat16, device="cuda")
    kv_src = torch.randn(2, 3, 2, 128, dtype=torch.bfloat16, device="cuda")
    q = torch.empty_like(q_src)
    config = LaunchConfig(16, 1, 32, splits, 4, 2, pdl_merge=True, pdl_attention=pdl_attention)
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        q.copy_(q_src)
        store_kv_triton(kv_src[0], kv_src[1], cache, meta.slot_mapping)
        paged_attention_triton(q, cache, meta, 0.1, config)       # compile outside the capture
        with torch.cuda.graph(graph, stream=stream):
            q.copy_(q_src)
            store_kv_triton(kv_src[0], kv_src[1], cache, meta.slot_mapping)
            out = paged_attention_triton(q, cache, meta, 0.1, config)
    for _ in range(3):
        q_src.normal_()
        kv_src.normal_()
        graph.replay()
        torch.cuda.synchronize()
        plain = paged_attention_triton(q_src, cache, meta, 0.1, dataclasses.replace(config, pdl_merge=False,
                                                                                    pdl_attention=False))
        torch.testing.assert_close(out, plain, atol=0, rtol=0)
        ref = paged_attention_reference(q_src.float(), cache.float(), meta, 0.1)
        torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)
