"""GPU diagnostics behind the engine numbers (not a benchmark of record): why copy-engine swap-ins
hide so little of their time behind a prefill, and where a decode step spends its time outside
the forward graph.

    python benchmarks/overlap_probe.py --out $OUT/probe

1. hardware: a GEMM loop on the compute stream with pinned host->device copies on a side stream,
   alone and together, with and without small host->device copies on the compute stream between
   the GEMMs (the engine's per-step metadata uploads): do those queue behind the bulk copies?
2. engine: one pipelined swap-in step per variant, its copies and kernels on a timeline.
3. engine: torch.profiler over decode steps at batch 8 (host ops, GPU ops, idle gaps).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from engine_bench import SWAP_VARIANTS, bench_swap, build, drain, engine_for, sync  # noqa: E402
from pensieve.engine import profiling  # noqa: E402
from pensieve.sampling_params import SamplingParams  # noqa: E402


def timed(fn, reps: int = 5) -> float:
    fn()
    sync()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    sync()
    return (time.perf_counter() - t) / reps * 1e3


def hardware() -> list[dict]:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    chunks = 32
    host = torch.empty((chunks, 4 << 20), dtype=torch.uint8).pin_memory()
    dev = torch.empty((chunks, 4 << 20), dtype=torch.uint8, device="cuda")
    small = torch.arange(1024, dtype=torch.int64).pin_memory()
    small_dev = torch.empty(1024, dtype=torch.int64, device="cuda")
    side = torch.cuda.Stream()

    def gemms(meta_copies: bool) -> None:
        for _ in range(chunks):
            if meta_copies:
                small_dev.copy_(small, non_blocking=True)
            a @ a

    def copies() -> None:
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for i in range(chunks):
                dev[i].copy_(host[i], non_blocking=True)
        torch.cuda.current_stream().wait_stream(side)

    def both(meta_copies: bool, copies_first: bool) -> None:
        side.wait_stream(torch.cuda.current_stream())
        if copies_first:
            with torch.cuda.stream(side):
                for i in range(chunks):
                    dev[i].copy_(host[i], non_blocking=True)
            gemms(meta_copies)
        else:  # interleaved issue: one copy per GEMM, as the engine issues a layer's copy per layer
            for i in range(chunks):
                with torch.cuda.stream(side):
                    dev[i].copy_(host[i], non_blocking=True)
                if meta_copies:
                    small_dev.copy_(small, non_blocking=True)
                a @ a
        torch.cuda.current_stream().wait_stream(side)

    g, c = timed(lambda: gemms(False)), timed(copies)
    rows = [dict(case="gemm alone", ms=g), dict(case="copies alone", ms=c, gbps=chunks * 4 * 2**20 / c / 1e6)]
    for meta in (False, True):
        for first in (True, False):
            t = timed(lambda: both(meta, first))
            rows.append(dict(case=f"both, copies {'issued first' if first else 'interleaved'}, "
                                  f"{'with' if meta else 'no'} small H2D on compute", ms=t,
                             hidden=max(0.0, (g + c - t) / c)))
    return rows


def timeline(engine, variant: str, tokens: int) -> dict:
    """One pipelined swap-in step under the profiler: its copies and compute, relative to the first."""
    r = bench_swap(engine, tokens, variant)  # also warms this variant up
    from pensieve.cache.manager import TransferPlan
    from pensieve.kernels import block_copy

    runner = engine.runner
    defaults = runner.transfer.dma_max_runs, block_copy._MAX_PROGRAMS
    runner.transfer.dma_max_runs, block_copy._MAX_PROGRAMS = SWAP_VARIANTS[variant]
    n_blocks = tokens // runner.block_size
    plan = TransferPlan(swap_in=[(i, i) for i in range(n_blocks)])
    ids = torch.randint(10, 1000, (2048,), device="cuda")
    import numpy as np
    positions = np.arange(tokens, tokens + 2048)
    fresh = list(range(n_blocks, n_blocks + 2048 // runner.block_size))
    meta_args = dict(positions=positions, qsl=np.array([0, 2048]), seq_lens=np.array([tokens + 2048]),
                     tables=[list(range(n_blocks)) + fresh],
                     slots=np.array([fresh[(p - tokens) // runner.block_size] * runner.block_size + p % runner.block_size
                                     for p in positions]), max_q=2048, decode_only=False)
    sync()
    with torch.profiler.profile(activities=profiling.activities(True)) as prof:
        wait = runner.transfer.start(plan)
        meta = runner._metadata(**meta_args, wait=wait)
        with torch.inference_mode():
            runner.model(ids, meta.positions, runner.kv_caches, meta)
        runner.transfer.settle(ran_forward=True)
        sync()
    runner.transfer.dma_max_runs, block_copy._MAX_PROGRAMS = defaults
    copies, kernels = [], []
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            span = (e.time_range.start, e.time_range.end, e.name[:40])
            (copies if e.name.startswith("Memcpy") or "_copy_blocks_kernel" in e.name else kernels).append(span)
    t0 = min(s[0] for s in copies + kernels)
    first_kernel = min(s[0] for s in kernels) - t0
    ku = profiling.interval_union([(a, b) for a, b, _ in kernels])
    # compute gaps longer than 20 us: where the forward stood still
    gaps = [(round(ku[i][1] - t0), round(ku[i + 1][0] - ku[i][1])) for i in range(len(ku) - 1) if ku[i + 1][0] - ku[i][1] > 20]
    return dict(variant=variant, tokens=tokens, hidden=r["hidden_share"], trace_share=r["trace_overlap_share"],
                first_kernel_us=round(first_kernel),
                copies=[(round(a - t0), round(b - a), n) for a, b, n in sorted(copies)][:48],
                compute_gaps=gaps[:40], compute_end_us=round(ku[-1][1] - t0))


def decode_profile(engine, batch: int = 8, ctx: int = 1024, rows: int = 30) -> str:
    cfg = engine.hf_config
    params = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
    for i in range(batch):
        engine.add_request(f"prof{i}", torch.randint(10, cfg.vocab_size - 10, (ctx,)).tolist(), params,
                           stream=True)
    while engine.scheduler.waiting or any(s.pending and s.num_pending > 1 for s in engine.scheduler.running):
        engine.step()
    for _ in range(3):
        engine.step()
    sync()
    with torch.profiler.profile(activities=profiling.activities(True)) as prof:
        for _ in range(10):
            engine.step()
        sync()
    kernels = sorted((e.time_range.start, e.time_range.end) for e in prof.events()
                     if e.device_type == torch.autograd.DeviceType.CUDA)
    ku = profiling.interval_union(kernels)
    busy = sum(b - a for a, b in ku)
    span = ku[-1][1] - ku[0][0]
    drain(engine)
    gaps = sorted(((b[0] - a[1]) for a, b in zip(ku, ku[1:])), reverse=True)
    head = (f"decode batch {batch}, async scheduling {engine.async_scheduling}: GPU busy {busy / 10:.0f} us of "
            f"{span / 10:.0f} us per step; idle gaps over 20 us: {sum(g > 20 for g in gaps) / 10:.1f} per step, "
            f"largest {[round(g) for g in gaps[:8]]} us")
    return profiling.report(head, prof, True, rows=rows)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", default="llama-3.1-8b")
    ap.add_argument("--decode-only", action="store_true",
                    help="only profile decode steps, with async scheduling off and on, at --batches")
    ap.add_argument("--batches", default="1,8")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.decode_only:
        engine = engine_for(build(args.model, Path("/tmp/pensieve-ckpt")), num_cpu_blocks=1024)
        reports = []
        for batch in map(int, args.batches.split(",")):
            for overlap in (False, True):
                engine.async_scheduling = overlap
                reports.append(decode_profile(engine, batch, rows=18))
                print(reports[-1].splitlines()[0], flush=True)
        (out / "decode_profile_async.txt").write_text("\n\n".join(reports))
        return 0
    result: dict = {"device": torch.cuda.get_device_name(), "hardware": hardware()}
    for r in result["hardware"]:
        print(r, flush=True)
    engine = engine_for(build(args.model, Path("/tmp/pensieve-ckpt")), num_cpu_blocks=8192)
    (out / "decode_profile.txt").write_text(decode_profile(engine))
    print((out / "decode_profile.txt").read_text()[:6000], flush=True)
    result["timelines"] = []
    layers = engine.runner.transfer.num_layers
    for variant, lookahead in (("dma", 2), ("dma", layers), ("kernel8", 2)):
        engine.runner.transfer.lookahead = lookahead
        t = timeline(engine, variant, 4096)
        t["lookahead"] = lookahead
        result["timelines"].append(t)
        print({k: v for k, v in t.items() if k not in ("copies", "compute_gaps")}, flush=True)
        print("  copies (start us, dur us):", [(a, d) for a, d, _ in t["copies"][:40]], flush=True)
        print("  compute gaps (at us, len us):", t["compute_gaps"][:20], flush=True)
    engine.runner.transfer.lookahead = 2
    (out / "probe.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
