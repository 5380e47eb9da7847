"""Where the attention kernel's time goes on the GPU (a diagnostic, not a benchmark of record).

    python benchmarks/attention_probe.py --out DIR            # decode configs: graph time + per-kernel times
    python benchmarks/attention_probe.py --ncu-target decode   # one launch to run under Nsight Compute

Decode at batch 1 reads 17 MB (4k tokens) in 16 us where a plain read of the same bytes takes 7 us
(kernel_bench read_floor, stop 12). This times each decode launch configuration from a CUDA graph
(as the runner replays it) and, from the profiler, the attention and merge kernels apart; with
Nsight Compute present it also records the default launch's stall reasons (decode and prefill).
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernel_bench import HBM_BYTES_PER_S, LLAMA3_8B, Bench, graph_round_robin_us, markdown_table  # noqa: E402

from pensieve.engine import profiling  # noqa: E402
from pensieve.kernels.attention import choose_config, paged_attention_triton  # noqa: E402

SHAPE = LLAMA3_8B
SCALE = 1.0 / math.sqrt(SHAPE.head_dim)
GROUP = SHAPE.num_heads // SHAPE.num_kv_heads


def kernel_times_us(fn, reps: int = 40) -> dict[str, float]:
    """Average device time per launch of each Triton kernel fn runs (profiler, eager launches)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    out = {}
    for key, launches, us in profiling.kernel_times(prof, reps):
        for name in ("_paged_attention_kernel", "_merge_splits_kernel"):
            if name in key:
                out[name.strip("_")] = us / max(launches, 1e-9)
    return out


def decode_configs(bench: Bench, rows: list[dict]) -> None:
    for batch, ctx in [(1, 4096), (1, 16384)]:
        metas, cache, q, kv_bytes = bench.decode_case(batch, ctx, SHAPE)
        base = choose_config(batch, 1, ctx, SHAPE.num_kv_heads, GROUP, SHAPE.head_dim, True, True)
        ref = paged_attention_triton(q, cache, metas[0], SCALE, dataclasses.replace(base, num_splits=1))
        # (stop 12's first probe also swept K loaded as rows: no difference)
        fns, timed = {}, {}
        for splits, warps, block_n, stages in itertools.product((16, 32, 64), (2, 4, 8), (32, 64, 128), (2, 3)):
            cfg = dataclasses.replace(base, num_splits=splits, num_warps=warps, block_n=block_n, num_stages=stages)
            row = dict(name=f"B{batch}_ctx{ctx}", default=cfg == base, splits=splits, warps=warps, block_n=block_n,
                       stages=stages)
            fn = Bench.rotating(metas, lambda m, cfg=cfg: paged_attention_triton(q, cache, m, SCALE, cfg))
            try:
                out = paged_attention_triton(q, cache, metas[0], SCALE, cfg)
                times = kernel_times_us(fn)
            except Exception as exc:  # record and go on
                row["error"] = repr(exc)[:160]
                rows.append(row)
                continue
            err = float((out.float() - ref.float()).norm() / ref.float().norm())
            row.update(**{f"{k}_us": v for k, v in times.items()}, rel_err_vs_unsplit=err)
            fns[len(fns)], timed[len(timed)] = fn, row
        # every launch in its own graph, replayed round-robin (stop 12 timed each in its own
        # do_bench_cudagraph and saw neighbours differ 2x; kernel_bench's decode sections moved in stop 13)
        graph_us = graph_round_robin_us(fns, calls=2 * len(metas))
        for key, row in timed.items():
            row.update(graph_us=graph_us[key], hbm_fraction=kv_bytes / (graph_us[key] * 1e-6) / HBM_BYTES_PER_S)
            rows.append(row)
            print(json.dumps(row), flush=True)
        del cache
        torch.cuda.empty_cache()


def ncu_target(which: str) -> None:
    """A few launches of the default configuration, for Nsight Compute to pick the last one."""
    bench = Bench(torch.device("cuda"), quick=True)
    if which == "decode":
        metas, cache, q, _ = bench.decode_case(1, 4096, SHAPE)
        for m in metas[:4]:
            paged_attention_triton(q, cache, m, SCALE)
    else:
        meta, cache, q, k, v, _ = bench.prefill_case(1, 4096, SHAPE)
        for _ in range(4):
            paged_attention_triton(q, cache, meta, SCALE, k=k, v=v)
    torch.cuda.synchronize()


def run_ncu(out_dir: Path) -> None:
    ncu = shutil.which("ncu") or next(iter(sorted(Path("/usr/local").glob("cuda*/bin/ncu"))), None)
    if ncu is None:
        (out_dir / "ncu.txt").write_text("ncu not found\n")
        return
    sections = ["SpeedOfLight", "Occupancy", "LaunchStats", "WarpStateStats", "SchedulerStats",
                "ComputeWorkloadAnalysis", "MemoryWorkloadAnalysis"]
    text = []
    for which in ("decode", "prefill"):
        cmd = [str(ncu), "-k", "regex:paged_attention", "--launch-skip", "3", "--launch-count", "1"]
        for s in sections:
            cmd += ["--section", s]
        cmd += [sys.executable, __file__, "--ncu-target", which]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
        text.append(f"===== {which}: {' '.join(cmd)}\n{res.stdout[-20000:]}\n{res.stderr[-3000:]}")
    (out_dir / "ncu.txt").write_text("\n".join(text))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--ncu-target", choices=("decode", "prefill"))
    parser.add_argument("--skip-ncu", action="store_true")
    args = parser.parse_args()
    if args.ncu_target:
        ncu_target(args.ncu_target)
        return
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.skip_ncu:
        run_ncu(args.out)
    rows: list[dict] = []
    try:
        decode_configs(Bench(torch.device("cuda"), quick=True), rows)
    finally:
        (args.out / "decode_probe.json").write_text(json.dumps(rows, indent=1))
        keys = ["name", "default", "splits", "warps", "block_n", "stages", "graph_us", "hbm_fraction",
                "paged_attention_kernel_us", "merge_splits_kernel_us", "rel_err_vs_unsplit", "error"]
        lines = markdown_table(rows, keys)
        (args.out / "decode_probe.md").write_text("\n".join(lines) + "\n")
        print("\n".join(lines))


if __name__ == "__main__":
    main()
