"""Where the prefill attention kernel stands against what Triton can do and against cuDNN, per launch.

    python benchmarks/prefill_probe.py --out DIR              # ours, a dense Triton kernel and SDPA
    python benchmarks/prefill_probe.py --rule --out DIR       # the small-prompt launch on other head layouts
    python benchmarks/prefill_probe.py --rule-mha --out DIR   # the same for MHA past its threshold

SDPA on the H100 runs cuDNN. Beside it this times a dense causal flash attention in plain Triton over
contiguous [B, H, N, D] tensors (no pages, no ragged batch, no GQA packing: the layout SDPA takes) and our
paged kernel, at the same launch configurations and shapes. What the dense kernel loses to cuDNN is
Triton's; what ours loses to the dense kernel is our layout's. Ours also runs as the engine runs it (new
K/V from the layer's tensors, no paged loop without cached context), with empty paged loops compiled in,
and gathered through the block table (as a recompute runs), and over cached context (a new turn, the
prefill Pensieve serves most). --rule and --rule-mha time `choose_config`'s small-prompt launch (64-row
tiles) against the default 128-row one, the evidence for its thresholds. Writes prefill_probe.json and
prefill_probe.md (one row per measurement). Needs a CUDA GPU; benchmarks/sass_loops.py compiles the
dense kernel here for sm_90 on any machine. Results: docs/BENCHMARKS.md, "Prefill attention".
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernel_bench import LLAMA3_8B, Bench, Shape, bench_ms, markdown_table, rel_err  # noqa: E402

from pensieve.kernels.attention import LaunchConfig, paged_attention_triton  # noqa: E402

_LOG2E = 1.4426950408889634


@triton.jit
def _dense_tile(acc, m_i, l_i, q, k_ptrs, v_ptrs, start_n, offs_m, offs_n, qk_scale, MASKED: tl.constexpr):
    k = tl.load(k_ptrs)                                   # [N, D]
    v = tl.load(v_ptrs)
    qk = tl.dot(q, tl.trans(k))
    if MASKED:
        qk = tl.where(offs_m[:, None] >= start_n + offs_n[None, :], qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)    # every row sees position 0 first: finite
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(qk * qk_scale - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
    return acc, m_new, l_i


@triton.jit
def _dense_causal_kernel(q, k, v, out, qk_scale, n_ctx, stride_h, stride_t,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr):
    # Heaviest query tiles first, as in our kernel; q/k/v/out are [B*H, N, D] with one stride set.
    start_m = tl.num_programs(0) - 1 - tl.program_id(0)
    base = tl.program_id(1).to(tl.int64) * stride_h
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    q_tile = tl.load(q + base + offs_m[:, None] * stride_t + offs_d[None, :])
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    kv_rows = offs_n[:, None] * stride_t + offs_d[None, :]
    full = (start_m * BLOCK_M) // BLOCK_N                 # tiles wholly below the diagonal
    for j in range(0, full):
        start_n = j * BLOCK_N
        acc, m_i, l_i = _dense_tile(acc, m_i, l_i, q_tile, k + base + start_n * stride_t + kv_rows,
                                    v + base + start_n * stride_t + kv_rows, start_n, offs_m, offs_n,
                                    qk_scale, False)
    for j in range(full, tl.cdiv((start_m + 1) * BLOCK_M, BLOCK_N)):
        start_n = j * BLOCK_N
        acc, m_i, l_i = _dense_tile(acc, m_i, l_i, q_tile, k + base + start_n * stride_t + kv_rows,
                                    v + base + start_n * stride_t + kv_rows, start_n, offs_m, offs_n,
                                    qk_scale, True)
    o = acc / l_i[:, None]
    tl.store(out + base + offs_m[:, None] * stride_t + offs_d[None, :], o.to(out.dtype.element_ty))


def dense_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                 block_m: int, block_n: int, warps: int, stages: int, maxnreg: int | None) -> torch.Tensor:
    """q, k, v: [B, H, N, D] contiguous, the GQA heads already expanded (as SDPA gets them)."""
    b, h, n, d = q.shape
    if n % block_m or n % block_n or not (q.is_contiguous() and k.is_contiguous() and v.is_contiguous()):
        raise ValueError(f"dense_causal needs contiguous q/k/v and N ({n}) a multiple of both tile sizes")
    out = torch.empty_like(q)
    extra = {"maxnreg": maxnreg} if maxnreg else {}
    _dense_causal_kernel[(n // block_m, b * h)](
        q, k, v, out, scale * _LOG2E, n, n * d, d,
        BLOCK_M=block_m, BLOCK_N=block_n, HEAD_DIM=d, num_warps=warps, num_stages=stages, **extra)
    return out


# (block_m, block_n, warps, stages, maxnreg): ours' default, then the usual Hopper flash-attention tiles
CONFIGS = [(128, 64, 8, 2, 128), (128, 128, 8, 3, None), (64, 64, 4, 3, None), (128, 128, 8, 2, None)]
SHAPES = [(1, 4096), (4, 1024), (4, 2048), (2, 8192), (8, 2048), (4, 4096)]
CTX_SHAPES = [(1, 2048, 2048), (4, 512, 1536), (8, 256, 1792)]   # a new turn over a cached conversation


def ours_config(block_m: int, block_n: int, warps: int, stages: int, maxnreg: int | None, group: int) -> LaunchConfig:
    return LaunchConfig(block_m, block_m // group, block_n, 1, warps, stages, k_nd=True, maxnreg=maxnreg)


def ours_variants(meta, launch: LaunchConfig):
    """(kind, metadata, launch) of each way ours can run the batch: as the engine runs a suffix prefill
    (new K/V from the layer's tensors, no paged loop without context), with the paged loops compiled
    in though empty, and every position gathered through the block table (how a recompute runs)."""
    yield "ours", meta, launch
    if not meta.has_context:
        yield "ours_ctxloops", dataclasses.replace(meta, has_context=True), launch
    yield "gather", dataclasses.replace(meta, new_tokens_are_suffix=False), launch


def probe(bench: Bench, rows: list[dict]) -> None:
    import torch.nn.functional as F

    mha = Shape("llama3-8b-mha", 32, 32, 128)     # the same q heads, one KV head each: no GQA packing
    group = LLAMA3_8B.num_heads // LLAMA3_8B.num_kv_heads
    scale = 1.0 / math.sqrt(LLAMA3_8B.head_dim)
    fields_of = lambda cfg: dict(zip(("block_m", "block_n", "warps", "stages", "maxnreg"), cfg))  # noqa: E731

    def add(name: str, kind: str, ms: float, flops: float, sdpa: float | None, err: float | None, **fields) -> None:
        row = dict(shape=name, kind=kind, **fields, ms=ms, ratio_vs_sdpa=ms / sdpa if sdpa else None,
                   tflops=flops / ms / 1e9, rel_err=err)
        rows.append(row)
        print(json.dumps(row), flush=True)

    def run_ours(name: str, meta, cache, q, k, v, flops: float, sdpa: float | None, ref: torch.Tensor) -> None:
        add(name, "ours_default", bench_ms(lambda: paged_attention_triton(q, cache, meta, scale, k=k, v=v)),
            flops, sdpa, rel_err(paged_attention_triton(q, cache, meta, scale, k=k, v=v), ref))
        for cfg in CONFIGS:
            for kind, m, launch in ours_variants(meta, ours_config(*cfg, group)):
                call = lambda: paged_attention_triton(q, cache, m, scale, launch, k, v)  # noqa: E731
                try:
                    add(name, kind, bench_ms(call), flops, sdpa, rel_err(call(), ref), **fields_of(cfg))
                except Exception as exc:  # out of shared memory or registers: record and go on
                    rows.append(dict(shape=name, kind=kind, **fields_of(cfg), error=repr(exc)[:160]))

    for batch, length in SHAPES:
        flops = bench.prefill_flops(batch, length, 0, LLAMA3_8B)
        name = f"{batch}x{length}"
        meta, cache, q, k, v, (qs, ks, vs) = bench.prefill_case(batch, length, LLAMA3_8B)
        sdpa = bench_ms(lambda: F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale))
        ref = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale)
        add(name, "sdpa", sdpa, flops, sdpa, 0.0)
        run_ours(name, meta, cache, q, k, v, flops, sdpa, ref.transpose(1, 2).reshape(q.shape))
        for cfg in CONFIGS:
            try:
                add(name, "dense", bench_ms(lambda: dense_causal(qs, ks, vs, scale, *cfg)), flops, sdpa,
                    rel_err(dense_causal(qs, ks, vs, scale, *cfg), ref), **fields_of(cfg))
            except Exception as exc:
                rows.append(dict(shape=name, kind="dense", **fields_of(cfg), error=repr(exc)[:160]))
        del meta, cache, q, k, v, qs, ks, vs, ref
        # Ours with one KV head per q head: the same work without packing 4 heads into a tile's rows
        meta, cache, q, k, v, _ = bench.prefill_case(batch, length, mha)
        add(name, "ours_mha", bench_ms(lambda: paged_attention_triton(q, cache, meta, scale, k=k, v=v)), flops,
            sdpa, None)
        del meta, cache, q, k, v
        torch.cuda.empty_cache()
    for batch, length, ctx in CTX_SHAPES:   # no SDPA here: ours against itself, checked against the gather path
        flops = bench.prefill_flops(batch, length, ctx, LLAMA3_8B)
        meta, cache, q, k, v, _ = bench.prefill_case(batch, length, LLAMA3_8B, ctx)
        ref = paged_attention_triton(q, cache, dataclasses.replace(meta, new_tokens_are_suffix=False), scale)
        run_ours(f"{batch}x{length}+ctx{ctx}", meta, cache, q, k, v, flops, None, ref)
        del meta, cache, q, k, v
        torch.cuda.empty_cache()


RULE_HEADS = [Shape("llama2-13b-gqa10", 40, 10, 128), Shape("mha-32", 32, 32, 128), Shape("group-8", 32, 4, 128)]
RULE_SHAPES = [(1, 2048), (1, 4096), (4, 1024), (8, 1024), (4, 2048)]
# MHA at and past its threshold (2^19 tokens x query heads), and over cached context
MHA_HEADS = [Shape("mha-32", 32, 32, 128), Shape("llama-2-13b", 40, 40, 128)]
MHA_SHAPES = [(8, 1024, 0), (4, 2048, 0), (1, 8192, 0), (16, 1024, 0), (4, 4096, 0), (2, 8192, 0),
              (1, 2048, 2048), (4, 512, 1536)]


def rule_check(bench: Bench, rows: list[dict], heads: list[Shape], shapes: list[tuple[int, int, int]]) -> None:
    """choose_config's small-prompt launch (64-row tiles) against the default 128-row one on other head
    layouts than the Llama-3-8B heads it was measured on. `auto` is what choose_config picks."""
    import torch.nn.functional as F

    for shape in heads:
        group_pad = 1 << (shape.num_heads // shape.num_kv_heads - 1).bit_length()
        scale = 1.0 / math.sqrt(shape.head_dim)
        for batch, length, ctx in shapes:
            flops = bench.prefill_flops(batch, length, ctx, shape)
            meta, cache, q, k, v, dense = bench.prefill_case(batch, length, shape, ctx)
            sdpa = None
            if dense is not None:
                qs, ks, vs = dense
                sdpa = bench_ms(lambda: F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale))
            name = f"{shape.name} {batch}x{length}" + (f"+ctx{ctx}" if ctx else "")
            for kind, cfg in (("auto", None), ("small", ours_config(64, 64, 4, 3, None, group_pad)),
                              ("large", ours_config(128, 64, 8, 2, 128, group_pad))):
                ms = bench_ms(lambda: paged_attention_triton(q, cache, meta, scale, cfg, k, v))
                row = dict(shape=name, kind=kind, ms=ms, ratio_vs_sdpa=ms / sdpa if sdpa else None,
                           tflops=flops / ms / 1e9)
                rows.append(row)
                print(json.dumps(row), flush=True)
            del meta, cache, q, k, v, dense
            torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--rule", action="store_true", help="only the small-prompt launch rule on other head layouts")
    parser.add_argument("--rule-mha", action="store_true", help="only the same for MHA past the threshold")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    try:
        bench = Bench(torch.device("cuda"), quick=True)
        if args.rule:
            rule_check(bench, rows, RULE_HEADS, [(b, n, 0) for b, n in RULE_SHAPES])
        elif args.rule_mha:
            rule_check(bench, rows, MHA_HEADS, MHA_SHAPES)
        else:
            probe(bench, rows)
    finally:
        (args.out / "prefill_probe.json").write_text(json.dumps(rows, indent=1))
        keys = ["shape", "kind", "block_m", "block_n", "warps", "stages", "maxnreg", "ms", "ratio_vs_sdpa",
                "tflops", "rel_err", "error"]
        lines = markdown_table(rows, keys)
        (args.out / "prefill_probe.md").write_text("\n".join(lines) + "\n")
        print("\n".join(lines))


if __name__ == "__main__":
    main()
