"""GPU benchmark of the Pensieve kernels: correctness first, then prefill, decode and block copy.

    python benchmarks/kernel_bench.py --out benchmarks/results/kernels [--quick]

Writes kernel_bench.json (one row per measurement, each with the device name) and kernel_bench.md.
Sections (each runs on its own; a failure is recorded and the rest go on):
  correctness  every kernel vs the PyTorch reference on GPU-sized bf16 inputs (incl. >2^31-element pools)
  prefill      the engine's prefill (new K/V from the layer's tensors) and all-gathered, vs SDPA(is_causal=True)
  decode       B x context, bytes of KV read per second as a share of 3.0 TB/s (KV rotated past L2)
  prefill_sweep tiles x warps x stages (not in the default list)
  prefill_regs tiles for two programs per SM, with register caps (not in the default list)
  sdpa_backends SDPA on 1 x 4096 under each backend (not in the default list)
  read_floor   the fastest plain read of the decode shapes' KV bytes, same timing (not in the default list)
  decode_sweep the default decode against the older split rule and its PDL variants, graphs round-robin (not in the default list)
  linear_sweep the decode step's linears at 1-64 rows: cuBLAS vs the small-batch Triton kernel (not in the default list)
  copy         host<->device block copies (one gather kernel over pinned memory) vs a per-block loop
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pensieve.kernels.attention import LaunchConfig, paged_attention_triton  # noqa: E402
from pensieve.kernels.block_copy import copy_blocks_triton  # noqa: E402
from pensieve.kernels.reference import (  # noqa: E402
    copy_blocks_reference,
    paged_attention_reference,
    store_kv_reference,
)
from pensieve.kernels.store import store_kv_triton  # noqa: E402
from pensieve.kernels.metadata import AttentionMetadata  # noqa: E402

HBM_BYTES_PER_S = 3.0e12      # H100 measured copy bandwidth (docs/BENCHMARKS.md quotes the floors)
L2_DEFEAT_BYTES = 200 << 20   # decode timings rotate over this much KV: 4x the H100's 50 MB L2
PCIE_BYTES_PER_S = 54e9       # pinned host<->device
BLOCK_SIZE = 16
DTYPE = torch.bfloat16


@dataclass(frozen=True)
class Shape:
    name: str
    num_heads: int
    num_kv_heads: int
    head_dim: int


@triton.jit
def _read_kernel(x, partial, n, BLOCK: tl.constexpr, ITERS: tl.constexpr):
    """A plain streaming read for read_floor: each program sums ITERS x BLOCK elements."""
    start = tl.program_id(0).to(tl.int64) * BLOCK * ITERS
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for i in tl.static_range(ITERS):
        offs = start + i * BLOCK + tl.arange(0, BLOCK)
        acc += tl.load(x + offs, mask=offs < n, other=0.0).to(tl.float32)
    tl.store(partial + tl.program_id(0), tl.sum(acc, 0))


LLAMA3_8B = Shape("llama3-8b", 32, 8, 128)
LLAMA2_13B_GQA = Shape("llama2-13b-gqa10", 40, 10, 128)


def bench_ms(fn: Callable[[], Any]) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def bench_graph_ms(fn: Callable[[], Any]) -> float:
    """Median time of fn replayed from a CUDA graph: GPU time without Python launch overhead
    (how the runner executes decode), and a check that the launch is capturable."""
    import triton.testing

    return float(triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median"))


def graph_round_robin_us(fns: dict[Any, Callable[[], Any]], calls: int, rounds: int = 15) -> dict[Any, float]:
    """Microseconds per call of each fn: every fn captured `calls` times in its own CUDA graph, the
    graphs replayed in turn for `rounds` rounds, the median round per fn."""
    graphs = {}
    stream = torch.cuda.Stream()
    for key, fn in fns.items():
        with torch.cuda.stream(stream):
            fn()                                   # compile and warm outside the capture
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=stream):
                for _ in range(calls):
                    fn()
        graphs[key] = graph
    torch.cuda.synchronize()
    samples: dict[Any, list[float]] = {key: [] for key in graphs}
    for _ in range(rounds):
        for key, graph in graphs.items():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            samples[key].append(start.elapsed_time(end) * 1e3 / calls)
    return {key: sorted(v)[len(v) // 2] for key, v in samples.items()}


def build_meta(
    seqs: list[tuple[int, list[int]]],   # (seq_len, new positions)
    num_blocks: int,
    device: torch.device,
    gen: torch.Generator,
    max_seq_len: int | None = None,
    high_blocks: bool = False,           # use the top of the pool (block ids * stride > 2^31)
) -> AttentionMetadata:
    per_seq = [-(-s // BLOCK_SIZE) for s, _ in seqs]
    need = sum(per_seq)
    assert need <= num_blocks, (need, num_blocks)
    if high_blocks:
        ids = num_blocks - need + torch.randperm(need, generator=gen)
    else:
        ids = torch.randperm(num_blocks, generator=gen)[:need]  # shuffled: KV is non-contiguous
    tables = torch.zeros((len(seqs), max(per_seq)), dtype=torch.int32)
    positions: list[int] = []
    slots: list[int] = []
    starts = [0]
    used = 0
    for b, ((seq_len, pos), n) in enumerate(zip(seqs, per_seq)):
        tables[b, :n] = ids[used:used + n].to(torch.int32)
        used += n
        positions += pos
        row = tables[b].tolist()
        slots += [row[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE for p in pos]
        starts.append(starts[-1] + len(pos))
    return AttentionMetadata(
        positions=torch.tensor(positions, dtype=torch.int64, device=device),
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
        seq_lens=torch.tensor([s for s, _ in seqs], dtype=torch.int32, device=device),
        block_tables=tables.to(device),
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        block_size=BLOCK_SIZE,
        max_query_len=max(len(p) for _, p in seqs),
        max_seq_len=max_seq_len or max(s for s, _ in seqs),
        decode_only=all(len(p) == 1 for _, p in seqs),
        # as the runner sets them: the new tokens' own K/V are read from the layer's tensors (when
        # passed) only if every sequence's new positions are its last ones
        new_tokens_are_suffix=all(p == list(range(s - len(p), s)) for s, p in seqs),
        has_context=any(s > len(p) for s, p in seqs),
    )


def l2_copies(nbytes: int) -> int:
    """Copies of an input to rotate over so that every timed call reads it from HBM, not L2."""
    return max(1, min(16, -(-L2_DEFEAT_BYTES // nbytes)))


def llama_linears(model: str) -> dict[str, tuple[int, int]]:
    """(N, K) of each linear of a Llama-family preset (pensieve.model.random_checkpoint.PRESETS)."""
    from pensieve.model.random_checkpoint import PRESETS

    c = PRESETS[model][1]
    heads, hidden, inter = c["num_attention_heads"], c["hidden_size"], c["intermediate_size"]
    head_dim = c.get("head_dim") or hidden // heads
    q, kv = heads * head_dim, c.get("num_key_value_heads", heads) * head_dim
    return {"qkv": (q + 2 * kv, hidden), "o": (hidden, q), "gate_up": (2 * inter, hidden), "down": (hidden, inter),
            "lm_head": (c["vocab_size"], hidden)}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.float(), ref.float()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-12))


class Bench:
    def __init__(self, device: torch.device, quick: bool):
        self.device, self.quick = device, quick
        self.device_name = torch.cuda.get_device_name(device)
        self.rows: list[dict[str, Any]] = []
        self.gen = torch.Generator().manual_seed(0)

    def add(self, section: str, name: str, **fields: Any) -> None:
        row = {"section": section, "name": name, "device": self.device_name, **fields}
        self.rows.append(row)
        print(json.dumps(row), flush=True)

    def cache(self, num_blocks: int, shape: Shape) -> torch.Tensor:
        c = torch.empty((num_blocks, 2, BLOCK_SIZE, shape.num_kv_heads, shape.head_dim), dtype=DTYPE, device=self.device)
        return c.normal_()

    # ---------------------------------------------------------------- correctness
    def correctness(self) -> None:
        shape = LLAMA3_8B
        scale = 1.0 / math.sqrt(shape.head_dim)
        mixed = [
            (1500, [1499]),                                          # decode
            (700, list(range(700))),                                 # prefill, no context
            (2000, list(range(300)) + list(range(1200, 2000))),      # recompute: prefix + new turn
            (900, list(range(600, 900))),                            # new turn over cached context
        ]
        decode = [(s, [s - 1]) for s in (4000, 130, 1, 2500, 9000)]
        cases: list[tuple[str, list[tuple[int, list[int]]], int | None]] = [
            ("mixed", mixed, None), ("decode", decode, None), ("decode_maxlen32k", decode, 32768)]
        for hq, hkv, d in ((32, 8, 128), (32, 32, 128), (28, 4, 64), (16, 2, 96), (16, 16, 256)):
            s = Shape(f"{hq}/{hkv}/d{d}", hq, hkv, d)
            sc = 1.0 / math.sqrt(d)
            for name, seqs, max_len in cases:
                meta = build_meta(seqs, 1500, self.device, self.gen, max_seq_len=max_len)
                cache = self.cache(1500, s)
                q = torch.randn((meta.positions.shape[0], hq, d), dtype=DTYPE, device=self.device)
                out = paged_attention_triton(q, cache, meta, sc)
                ref = paged_attention_reference(q, cache, meta, sc)
                err = rel_err(out, ref)
                self.add("correctness", f"attention_{name}", shape=s.name, rel_err=err, ok=err < 2e-2)
        # int64 offsets: block ids near the top of a pool of > 2^31 elements.
        free = torch.cuda.mem_get_info(self.device)[0]
        elems_per_block = 2 * BLOCK_SIZE * shape.num_kv_heads * shape.head_dim
        big_blocks = (2**31 // elems_per_block) + 2048
        if free > 2.5 * big_blocks * elems_per_block * 2:
            cache = self.cache(big_blocks, shape)
            meta = build_meta(mixed, big_blocks, self.device, self.gen, high_blocks=True)
            q = torch.randn((meta.positions.shape[0], shape.num_heads, shape.head_dim), dtype=DTYPE, device=self.device)
            err = rel_err(paged_attention_triton(q, cache, meta, scale), paged_attention_reference(q, cache, meta, scale))
            self.add("correctness", "attention_int64_offsets", shape=shape.name, rel_err=err, ok=err < 2e-2)
            k = torch.randn((meta.positions.shape[0], shape.num_kv_heads, shape.head_dim), dtype=DTYPE, device=self.device)
            v = torch.randn_like(k)
            store_kv_triton(k, v, cache, meta.slot_mapping)
            blocks, offs = meta.slot_mapping // BLOCK_SIZE, meta.slot_mapping % BLOCK_SIZE
            ok = torch.equal(cache[blocks, 0, offs], k) and torch.equal(cache[blocks, 1, offs], v)
            self.add("correctness", "store_int64_offsets", shape=shape.name, ok=ok)
            del cache
            torch.cuda.empty_cache()
        # Store: exact equality with the reference, skipped slots included.
        cache = self.cache(512, shape)
        expected = cache.clone()
        T = 1000
        slots = torch.randperm(512 * BLOCK_SIZE, generator=self.gen)[:T].to(self.device)
        slots[::7] = -1
        qkv = torch.randn((T, (shape.num_heads + 2 * shape.num_kv_heads) * shape.head_dim), dtype=DTYPE, device=self.device)
        kd = shape.num_kv_heads * shape.head_dim
        k = qkv[:, -2 * kd:-kd].view(T, shape.num_kv_heads, shape.head_dim)
        v = qkv[:, -kd:].view(T, shape.num_kv_heads, shape.head_dim)
        store_kv_reference(k, v, expected, slots)
        store_kv_triton(k, v, cache, slots)
        self.add("correctness", "store_kv", shape=shape.name, ok=torch.equal(cache, expected))
        # Block copy in every direction: UVA (pinned host) and device<->device.
        gpu = self.cache(256, shape)
        host = torch.randn(gpu.shape, dtype=torch.float32).to(DTYPE).pin_memory()
        src_ids = torch.randperm(256, generator=self.gen)[:100]
        dst_ids = torch.randperm(256, generator=self.gen)[:100]
        for direction, src, dst in (("h2d", host, gpu), ("d2h", gpu, host), ("d2d", gpu, gpu.clone())):
            expected = dst.clone()
            copy_blocks_reference(src, expected, src_ids, dst_ids)
            copy_blocks_triton(src, dst, src_ids.to(self.device), dst_ids.to(self.device))
            torch.cuda.synchronize()
            self.add("correctness", f"copy_blocks_{direction}", shape=shape.name, ok=torch.equal(dst.cpu(), expected.cpu()))
        pageable = host.clone()  # not pinned: takes the coalesced-runs fallback
        expected = pageable.clone()
        copy_blocks_reference(gpu, expected, src_ids, dst_ids)
        copy_blocks_triton(gpu, pageable, src_ids, dst_ids)
        torch.cuda.synchronize()
        self.add("correctness", "copy_blocks_d2h_pageable", shape=shape.name, ok=torch.equal(pageable, expected))

    # ---------------------------------------------------------------- prefill
    def prefill_case(self, batch: int, length: int, shape: Shape, ctx: int = 0):
        """`batch` causal prefills of `length` new tokens over `ctx` cached ones each, all KV in
        shuffled pages; q, k, v as the model passes them (strided views of one projection, k and v
        holding the values the store wrote to the cache); and SDPA's inputs for ctx == 0: the same
        values as contiguous [B, H, T, D] with the GQA heads expanded outside any timing."""
        seqs = [(ctx + length, list(range(ctx, ctx + length)))] * batch
        num_blocks = batch * (ctx + length) // BLOCK_SIZE + 64
        meta = build_meta(seqs, num_blocks, self.device, self.gen)
        cache = self.cache(num_blocks, shape)
        hq, hkv, d = shape.num_heads, shape.num_kv_heads, shape.head_dim
        qkv = torch.randn((batch * length, hq + 2 * hkv, d), dtype=DTYPE, device=self.device)
        q, k, v = qkv.split([hq, hkv, hkv], dim=1)
        slots = meta.slot_mapping
        k.copy_(cache[slots // BLOCK_SIZE, 0, slots % BLOCK_SIZE])
        v.copy_(cache[slots // BLOCK_SIZE, 1, slots % BLOCK_SIZE])
        sdpa_inputs = None
        if ctx == 0:
            group = hq // hkv
            kv = cache[meta.block_tables.long()]                 # [B, nb, 2, bs, Hkv, D]

            def dense(i: int) -> torch.Tensor:
                x = kv[:, :, i].reshape(batch, -1, hkv, d)[:, :length]
                return x.repeat_interleave(group, dim=2).transpose(1, 2).contiguous()

            qs = q.reshape(batch, length, hq, d).transpose(1, 2).contiguous()
            sdpa_inputs = (qs, dense(0), dense(1))
        return meta, cache, q, k, v, sdpa_inputs

    @staticmethod
    def prefill_flops(batch: int, length: int, ctx: int, shape: Shape) -> float:
        return 4 * batch * (length * ctx + length * (length + 1) / 2) * shape.num_heads * shape.head_dim

    def prefill(self) -> None:
        """The engine's prefill (new K/V passed, as every layer does) against SDPA, and the same
        kernel with every position gathered from the cache (how a recompute batch runs)."""
        import torch.nn.functional as F

        shape = LLAMA3_8B
        scale = 1.0 / math.sqrt(shape.head_dim)
        configs = [(1, 4096), (4, 1024), (4, 2048), (2, 8192), (8, 2048), (4, 4096)]
        if self.quick:
            configs = [(1, 4096), (4, 2048)]
        for batch, length in configs:
            meta, cache, q, k, v, (qs, ks, vs) = self.prefill_case(batch, length, shape)
            T = batch * length
            ours = bench_ms(lambda: paged_attention_triton(q, cache, meta, scale, k=k, v=v))
            gathered = bench_ms(lambda: paged_attention_triton(q, cache, meta, scale))
            sdpa = bench_ms(lambda: F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale))
            flops = self.prefill_flops(batch, length, 0, shape)
            out = paged_attention_triton(q, cache, meta, scale, k=k, v=v)
            ref = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale).transpose(1, 2).reshape_as(out)
            self.add("prefill", f"{batch}x{length}", shape=shape.name, tokens=T, ours_ms=ours, sdpa_ms=sdpa,
                     ratio=ours / sdpa, ours_tflops=flops / ours / 1e9, sdpa_tflops=flops / sdpa / 1e9,
                     gathered_ms=gathered, gathered_ratio=gathered / sdpa, rel_err_vs_sdpa=rel_err(out, ref))
            del cache, q, k, v, qs, ks, vs
            torch.cuda.empty_cache()

    def sdpa_backends(self) -> None:
        """SDPA's time on 1 x 4096 under each backend it has here: which one the default picks."""
        import torch.nn.functional as F
        from torch.nn.attention import SDPBackend, sdpa_kernel

        shape = LLAMA3_8B
        scale = 1.0 / math.sqrt(shape.head_dim)
        _, cache, _, _, _, (qs, ks, vs) = self.prefill_case(1, 4096, shape)
        flops = self.prefill_flops(1, 4096, 0, shape)
        for name in ("default", "CUDNN_ATTENTION", "FLASH_ATTENTION", "EFFICIENT_ATTENTION"):
            call = lambda: F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale)  # noqa: E731
            try:
                if name == "default":
                    ms = bench_ms(call)
                else:
                    with sdpa_kernel(getattr(SDPBackend, name)):
                        ms = bench_ms(call)
            except Exception as exc:  # a backend this build lacks: record, go on
                self.add("sdpa_backends", name, error=repr(exc)[:160])
                continue
            self.add("sdpa_backends", name, ms=ms, tflops=flops / ms / 1e9)
        del cache

    def prefill_configs(self, section: str, shapes: list[tuple[int, int, int]],
                        variants: Callable[[LaunchConfig], Iterable[tuple[dict[str, Any], LaunchConfig]]]) -> None:
        """Each (label fields, launch config) that `variants(default config)` yields, timed on each
        (batch, new tokens, cached tokens) shape, against SDPA where there is no context, and checked
        against the default configuration's output."""
        import torch.nn.functional as F

        from pensieve.kernels.attention import choose_config

        shape = LLAMA3_8B
        scale = 1.0 / math.sqrt(shape.head_dim)
        group = shape.num_heads // shape.num_kv_heads
        for batch, length, ctx in shapes:
            meta, cache, q, k, v, sdpa_inputs = self.prefill_case(batch, length, shape, ctx)
            sdpa = None
            if sdpa_inputs is not None:
                qs, ks, vs = sdpa_inputs
                sdpa = bench_ms(lambda: F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale))
            base = choose_config(batch, length, ctx + length, shape.num_kv_heads, group, shape.head_dim, False, True)
            ref = paged_attention_triton(q, cache, meta, scale, base, k, v)
            flops = self.prefill_flops(batch, length, ctx, shape)
            name = f"{batch}x{length}" + (f"+ctx{ctx}" if ctx else "")
            for fields, cfg in variants(base):
                try:
                    out = paged_attention_triton(q, cache, meta, scale, cfg, k, v)
                    ms = bench_ms(lambda: paged_attention_triton(q, cache, meta, scale, cfg, k, v))
                except Exception as exc:  # out of shared memory, or a lever this Triton lacks: record, go on
                    self.add(section, name, **fields, error=repr(exc)[:160])
                    continue
                self.add(section, name, **fields, default=cfg == base, ours_ms=ms, sdpa_ms=sdpa,
                         ratio=ms / sdpa if sdpa else None, tflops=flops / ms / 1e9,
                         rel_err_vs_default=rel_err(out, ref))
            del cache, q, k, v, sdpa_inputs
            torch.cuda.empty_cache()

    def prefill_sweep(self) -> None:
        """Launch configurations of the prefill path: tiles, warps, stages. (Where new K/V come from
        and Triton's warp specialization were dropped as levers: benchmarks/results/HISTORY.md,
        Measured and dropped.)"""
        def variants(base: LaunchConfig):
            for block_m, block_n, warps, stages in itertools.product((64, 128), (64, 128), (4, 8), (2, 3, 4)):
                if block_m == 64 and warps == 8:
                    continue
                yield (dict(block_m=block_m, block_n=block_n, warps=warps, stages=stages),
                       dataclasses.replace(base, block_m=block_m, block_q=block_m // 4, block_n=block_n,
                                           num_warps=warps, num_stages=stages, maxnreg=None))

        self.prefill_configs("prefill_sweep", [(1, 4096, 0), (4, 2048, 0), (4, 1024, 0), (1, 2048, 2048)], variants)

    def prefill_regs(self) -> None:
        """Tiles small enough for two programs per SM (uncapped 128 x 128 tiles take 255 registers and
        165 KB of shared memory: one 8-warp program per SM, benchmarks/results/kernels/prefill-sdpa-a3e479f/ncu.txt),
        with and without a register cap, against the default."""
        def variants(base: LaunchConfig):
            yield dict(block_m=base.block_m, block_n=base.block_n, warps=base.num_warps, stages=base.num_stages), base
            for block_m, block_n, warps, stages, cap in [
                    (128, 64, 8, 2, None), (128, 64, 8, 2, 128), (128, 64, 8, 2, 168),
                    (64, 64, 4, 2, None), (64, 64, 4, 2, 128), (64, 64, 4, 2, 168),
                    (64, 128, 4, 2, None), (64, 128, 4, 2, 168), (128, 128, 8, 2, 128)]:
                yield (dict(block_m=block_m, block_n=block_n, warps=warps, stages=stages, maxnreg=cap),
                       dataclasses.replace(base, block_m=block_m, block_q=block_m // 4, block_n=block_n,
                                           num_warps=warps, num_stages=stages, maxnreg=cap))

        self.prefill_configs("prefill_regs", [(1, 4096, 0), (4, 2048, 0), (4, 1024, 0), (1, 2048, 2048)], variants)

    # ---------------------------------------------------------------- decode
    def decode_case(self, batch: int, ctx: int, shape: Shape):
        """`batch` decode tokens over `ctx` cached tokens each, in several copies on disjoint blocks
        (together >= 4x the 50 MB L2), and a timed call that takes the next copy each time: every
        call reads its KV from HBM, as a real step does (one copy repeated would be served from L2)."""
        kv_bytes = batch * ctx * 2 * shape.num_kv_heads * shape.head_dim * DTYPE.itemsize
        copies = l2_copies(kv_bytes)
        seqs = [(ctx, [ctx - 1])] * (batch * copies)
        num_blocks = batch * copies * (-(-ctx // BLOCK_SIZE)) + 16
        full = build_meta(seqs, num_blocks, self.device, self.gen)
        metas = [dataclasses.replace(
            full, positions=full.positions[i * batch:(i + 1) * batch],
            query_start_loc=full.query_start_loc[:batch + 1], seq_lens=full.seq_lens[i * batch:(i + 1) * batch],
            block_tables=full.block_tables[i * batch:(i + 1) * batch],
            slot_mapping=full.slot_mapping[i * batch:(i + 1) * batch]) for i in range(copies)]
        cache = self.cache(num_blocks, shape)
        q = torch.randn((batch, shape.num_heads, shape.head_dim), dtype=DTYPE, device=self.device)
        return metas, cache, q, kv_bytes

    @staticmethod
    def rotating(metas: list[AttentionMetadata], call: Callable[[AttentionMetadata], Any]) -> Callable[[], Any]:
        turn = itertools.count()
        return lambda: call(metas[next(turn) % len(metas)])

    def decode(self) -> None:
        """The default decode launch, timed from CUDA graphs replayed round-robin with the launch the
        runner captures (max_seq_len = max_model_len = 32k fixes its split count)."""
        shape = LLAMA3_8B
        scale = 1.0 / math.sqrt(shape.head_dim)
        grid = [(b, c) for b in (1, 8, 32, 64) for c in (4096, 16384, 32768)] + [(2, 4096), (4, 4096)]
        if self.quick:
            grid = [(1, 4096), (1, 16384), (8, 4096), (32, 4096), (64, 32768)]
        for batch, ctx in grid:
            metas, cache, q, kv_bytes = self.decode_case(batch, ctx, shape)
            eager = bench_ms(self.rotating(metas, lambda m: paged_attention_triton(q, cache, m, scale)))
            graph_metas = [dataclasses.replace(m, max_seq_len=32768) for m in metas]
            times = graph_round_robin_us({
                "own": self.rotating(metas, lambda m: paged_attention_triton(q, cache, m, scale)),
                "maxlen32k": self.rotating(graph_metas, lambda m: paged_attention_triton(q, cache, m, scale)),
                # One copy over and over: its KV stays in L2 when it fits (the L2-served time, for
                # comparison; benchmarks/results/HISTORY.md, Measurement pitfalls: "Decode from L2").
                "same_kv": lambda: paged_attention_triton(q, cache, metas[0], scale),
            }, calls=2 * len(metas))
            ms, ms_graph = times["own"] / 1e3, times["maxlen32k"] / 1e3
            self.add("decode", f"B{batch}_ctx{ctx}", shape=shape.name, ms=ms, ms_maxlen32k=ms_graph, eager_ms=eager,
                     ms_same_kv=times["same_kv"] / 1e3, gb_per_s=kv_bytes / ms / 1e6,
                     hbm_fraction=kv_bytes / (ms * 1e-3) / HBM_BYTES_PER_S,
                     hbm_fraction_maxlen32k=kv_bytes / (ms_graph * 1e-3) / HBM_BYTES_PER_S)
            del cache
            torch.cuda.empty_cache()

    def read_floor(self) -> None:
        """What any kernel pays to read the decode shapes' KV bytes from HBM once: a plain streaming
        read (each program sums its slice; the best of several grid shapes) and torch.sum, timed
        like decode (CUDA graph, copies rotated past L2). The decode kernel's fraction of 3.0 TB/s
        at batch 1 x 4k is bounded by this, not by 3.0 TB/s."""
        import triton

        shape = LLAMA3_8B
        per_token = 2 * shape.num_kv_heads * shape.head_dim * DTYPE.itemsize
        for batch, ctx in [(1, 4096), (1, 16384), (1, 32768), (8, 4096)]:
            nbytes = batch * ctx * per_token
            n = nbytes // DTYPE.itemsize
            copies = l2_copies(nbytes)
            bufs = [torch.randn(n, dtype=DTYPE, device=self.device) for _ in range(copies)]
            best = None
            for block, iters, warps in itertools.product((2048, 8192), (1, 4, 16), (4, 8)):
                grid = triton.cdiv(n, block * iters)
                partial = torch.empty(grid, dtype=torch.float32, device=self.device)
                turn = itertools.count()

                def read() -> None:
                    _read_kernel[(grid,)](bufs[next(turn) % copies], partial, n, BLOCK=block, ITERS=iters,
                                          num_warps=warps)

                ms = bench_graph_ms(read)
                self.add("read_floor", f"B{batch}_ctx{ctx}", how="triton", block=block, iters=iters, warps=warps,
                         programs=grid, ms=ms, hbm_fraction=nbytes / (ms * 1e-3) / HBM_BYTES_PER_S)
                best = ms if best is None else min(best, ms)
            turn = itertools.count()
            ms = bench_graph_ms(lambda: bufs[next(turn) % copies].sum(dtype=torch.float32))
            self.add("read_floor", f"B{batch}_ctx{ctx}", how="torch.sum", ms=ms,
                     hbm_fraction=nbytes / (ms * 1e-3) / HBM_BYTES_PER_S, best_triton_ms=best)
            del bufs
            torch.cuda.empty_cache()

    def decode_sweep(self) -> None:
        """The default decode split against the older split rule (variant "old_rule", the launch that
        benchmarks/results/kernels/prefill-sdpa-a3e479f/ timed: about two programs per SM, 64-position tiles,
        3 stages), with and without programmatic dependent launch (PDL) of the merge and of the
        attention kernel, alone and, as in a layer, right after the store of the new token's K/V (the
        store alone beside them). Every variant is captured in its own CUDA graph (calls rotated over
        copies of the KV past L2) and the graphs are replayed round-robin, so clock or host drift
        lands on every variant alike; the median round is reported (timing each configuration in its
        own do_bench_cudagraph makes neighbours differ 2x while their kernel times agree:
        benchmarks/results/HISTORY.md, Measurement pitfalls). The wider sweep of splits x KV tiles x
        stages behind the default: benchmarks/results/kernels/decode-split-424e8c1/decode_sweep_df1e751.md."""
        from pensieve.kernels.attention import choose_config

        shape = LLAMA3_8B
        scale = 1.0 / math.sqrt(shape.head_dim)
        group = shape.num_heads // shape.num_kv_heads
        grid = [(1, 4096), (1, 16384), (1, 32768), (2, 4096), (4, 4096), (8, 4096), (16, 4096), (32, 4096),
                (64, 4096)]
        if self.quick:
            grid = [(1, 4096), (1, 16384)]
        for batch, ctx in grid:
            metas, cache, q, kv_bytes = self.decode_case(batch, ctx, shape)
            base = choose_config(batch, 1, ctx, shape.num_kv_heads, group, shape.head_dim, True, True)
            plain = dataclasses.replace(base, pdl_merge=False, pdl_attention=False)
            ref = paged_attention_triton(q, cache, metas[0], scale, dataclasses.replace(plain, num_splits=1))
            # the older rule: about two programs per SM, >= 256 positions per split, 64-position tiles, 3 stages
            old = min(-(-264 // (batch * shape.num_kv_heads)), max(1, ctx // 256), 64)
            old_rule = dataclasses.replace(plain, num_splits=1 << (old.bit_length() - 1), block_n=64, num_stages=3)
            variants = {  # name: (config, the KV store before it?)
                "plain": (plain, False),
                "pdl_merge": (dataclasses.replace(plain, pdl_merge=True), False),
                "pdl_both": (dataclasses.replace(plain, pdl_merge=True, pdl_attention=True), False),
                "old_rule": (old_rule, False),
                "store+plain": (plain, True),
                "store+pdl_merge": (dataclasses.replace(plain, pdl_merge=True), True),
                "store+pdl_both": (dataclasses.replace(plain, pdl_merge=True, pdl_attention=True), True),
                "store+old_rule": (old_rule, True),
                "store alone": (None, True),
            }
            k_new = torch.randn((batch, shape.num_kv_heads, shape.head_dim), dtype=DTYPE, device=self.device)

            def step(m: AttentionMetadata, cfg: LaunchConfig | None, store: bool) -> None:
                if store:
                    store_kv_triton(k_new, k_new, cache, m.slot_mapping)
                if cfg is not None:
                    paged_attention_triton(q, cache, m, scale, cfg)

            errors = {name: rel_err(paged_attention_triton(q, cache, metas[0], scale, cfg), ref)
                      for name, (cfg, _) in variants.items() if cfg is not None}
            times = graph_round_robin_us(
                {name: self.rotating(metas, lambda m, v=v: step(m, *v)) for name, v in variants.items()},
                calls=2 * len(metas))
            for name, us in times.items():
                cfg = variants[name][0] or plain
                self.add("decode_sweep", f"B{batch}_ctx{ctx}", variant=name, splits=cfg.num_splits,
                         block_n=cfg.block_n, stages=cfg.num_stages, us=us,
                         hbm_fraction=kv_bytes / (us * 1e-6) / HBM_BYTES_PER_S, rel_err_vs_unsplit=errors.get(name))
            del cache
            torch.cuda.empty_cache()

    # ---------------------------------------------------------------- small-batch linear
    LINEAR_SHAPES = tuple(  # (model, layer, N, K): the decode step's weight matrices (13B-GQA10 differs only in qkv)
        (model, layer, *llama_linears(model)[layer])
        for model, layers in (("llama-3.1-8b", ("qkv", "o", "gate_up", "down", "lm_head")),
                              ("llama-2-13b-gqa10", ("qkv",)), ("llama-2-13b", ("qkv", "o", "gate_up", "down")))
        for layer in layers)

    def linear_sweep(self) -> None:
        """The decode step's linears at 1-64 rows: cuBLAS (F.linear) against the small-batch Triton
        kernel's default launch and its neighbours (tiles, stages), as bytes of weight read per second
        (a share of 3.0 TB/s). Weights rotate over copies past L2; graphs replayed round-robin.
        (The wider sweep behind the default, 104 launches at 8 rows with split K and unswapped
        operands: benchmarks/results/kernels/linear-835ab1c/linear_sweep_0cd076c.md.)"""
        import torch.nn.functional as F

        from pensieve.kernels import SmallLinearWorkspace
        from pensieve.kernels.linear import SmallLinearConfig, choose_small_linear, rows_per_program, small_batch_linear

        sms = torch.cuda.get_device_properties(self.device).multi_processor_count
        shapes = self.LINEAR_SHAPES[:2] if self.quick else self.LINEAR_SHAPES
        for model, layer, n, k in shapes:
            nbytes = n * k * DTYPE.itemsize
            copies = l2_copies(nbytes)
            ws = [torch.randn((n, k), dtype=DTYPE, device=self.device) for _ in range(copies)]
            calls = copies * max(1, min(32, round(200e-6 / (nbytes / HBM_BYTES_PER_S))))
            for rows in (1, 8, 16, 32, 64):
                block_m = rows_per_program(rows)
                grid = [SmallLinearConfig(bn, bk, 1, True, 4, stages)
                        for bn, bk, stages in itertools.product((32, 64, 128), (128, 256), (3, 4))
                        if (bn + block_m) * bk * 2 * stages <= 160 << 10]
                x = torch.randn((rows, k), dtype=DTYPE, device=self.device)
                ref = F.linear(x, ws[0]).float()
                work = SmallLinearWorkspace()
                variants = {"cublas": None, "default": choose_small_linear(n, k, sms),
                            **{f"n{c.block_n}k{c.block_k}s{c.num_stages}": c for c in grid}}
                fns, errors = {}, {}
                for name, cfg in variants.items():
                    turn = itertools.count()
                    if cfg is None:
                        fns[name] = lambda turn=turn: F.linear(x, ws[next(turn) % copies])
                        continue
                    out = small_batch_linear(x, ws[0], None, work, cfg, sms)
                    errors[name] = ((out.float() - ref).abs().max() / ref.abs().max()).item()
                    fns[name] = lambda cfg=cfg, turn=turn: small_batch_linear(x, ws[next(turn) % copies], None, work, cfg, sms)
                times = graph_round_robin_us(fns, calls=calls)
                for name, us in times.items():
                    cfg = variants[name]
                    self.add("linear_sweep", f"{model}.{layer}", n=n, k=k, rows=rows, variant=name,
                             **(dataclasses.asdict(cfg) if cfg else {}), us=us,
                             hbm_fraction=nbytes / (us * 1e-6) / HBM_BYTES_PER_S, rel_err=errors.get(name),
                             vs_cublas=times["cublas"] / us)
                best = min((v for v in times if v != "cublas"), key=times.get)
                print(f"linear {model}.{layer} rows {rows}: cublas {times['cublas']:.1f} us, default "
                      f"{times['default']:.1f}, best {times[best]:.1f} ({best})", flush=True)
            del ws
            torch.cuda.empty_cache()

    # ---------------------------------------------------------------- block copy
    def copy(self) -> None:
        counts = (32, 256, 1024) if not self.quick else (256,)
        for shape in (LLAMA2_13B_GQA, LLAMA3_8B):
            pool = 4096
            gpu = self.cache(pool, shape)
            host = torch.empty(gpu.shape, dtype=DTYPE).pin_memory()
            block_bytes = gpu[0].numel() * gpu.element_size()
            for n in counts:
                src_ids = torch.randperm(pool, generator=self.gen)[:n]
                dst_ids = torch.randperm(pool, generator=self.gen)[:n]
                s_dev, d_dev = src_ids.to(self.device), dst_ids.to(self.device)
                s_list, d_list = src_ids.tolist(), dst_ids.tolist()
                for direction, src, dst in (("h2d", host, gpu), ("d2h", gpu, host)):
                    ours = bench_ms(lambda: copy_blocks_triton(src, dst, s_dev, d_dev))

                    def loop() -> None:
                        for s, d in zip(s_list, d_list):
                            dst[d].copy_(src[s], non_blocking=True)

                    naive = bench_ms(loop)
                    nbytes = n * block_bytes
                    self.add("copy", f"{direction}_{n}blk", shape=shape.name, block_kb=block_bytes / 1024,
                             ours_ms=ours, loop_ms=naive, ours_gb_per_s=nbytes / ours / 1e6,
                             loop_gb_per_s=nbytes / naive / 1e6, ours_fraction=nbytes / (ours * 1e-3) / PCIE_BYTES_PER_S)
            del gpu, host
            torch.cuda.empty_cache()

    # ---------------------------------------------------------------- report
    def markdown(self) -> str:
        lines = [f"# Kernel bench on {self.device_name}", ""]
        for section in ("correctness", "prefill", "sdpa_backends", "prefill_sweep", "prefill_regs",
                        "decode", "read_floor",
                        "decode_sweep", "linear_sweep", "copy", "error"):
            rows = [r for r in self.rows if r["section"] == section]
            if not rows:
                continue
            keys = [k for k in rows[0] if k not in ("section", "device")]
            for r in rows[1:]:
                keys += [k for k in r if k not in keys and k not in ("section", "device")]
            lines += [f"## {section}", "", *markdown_table(rows, keys), ""]
        return "\n".join(lines)


def markdown_table(rows: list[dict[str, Any]], keys: list[str]) -> list[str]:
    """The lines of a markdown table of rows under keys (a row without a key leaves its cell empty)."""
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    return lines + ["| " + " | ".join(_fmt(r.get(k, "")) for k in keys) + " |" for r in rows]


def _fmt(x: Any) -> str:
    if isinstance(x, float):
        return f"{x:.4g}"
    return str(x).replace("|", "/").replace("\n", " ")[:200]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--quick", action="store_true", help="a small subset of every section")
    parser.add_argument("--sections", default="correctness,prefill,decode,copy")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("kernel_bench.py needs a CUDA GPU")
    args.out.mkdir(parents=True, exist_ok=True)
    bench = Bench(torch.device("cuda", torch.cuda.current_device()), args.quick)
    for section in args.sections.split(","):
        t0 = time.time()
        try:
            getattr(bench, section)()
        except Exception as exc:  # record and go on: one broken section must not hide the others
            traceback.print_exc()
            bench.add("error", section, error=f"{type(exc).__name__}: {exc}")
            torch.cuda.empty_cache()
        print(f"[{section}: {time.time() - t0:.1f}s]", flush=True)
        # written after every section: a run cut off by a time limit keeps what it measured
        (args.out / "kernel_bench.json").write_text(json.dumps(bench.rows, indent=1))
        md = bench.markdown()
        (args.out / "kernel_bench.md").write_text(md)
    print("\n" + md)


if __name__ == "__main__":
    main()
