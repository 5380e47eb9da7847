#!/usr/bin/env python
"""The paper's multi-turn evaluation on one GPU: systems side by side on one workload, one seed, one KV budget.

    python benchmarks/multiturn.py --model-shape llama-2-13b-gqa10 --systems tiered,gpu,stateless,transformers \
        --rates 0.5,1,2,4 --duration 120 --time-scale 0.1 --out benchmarks/results/llama13b

builds (once) a random-weight checkpoint of the named shape, runs every system over the rate sweep and writes
results.json, summary.md, latency.png and command.txt. `--quick` is a CPU-sized smoke run with the tiny random Llama.
Ablations: --systems tiered,tiered-lru,tiered-noaot,tiered-nopipe (or --eviction-policy lru, --no-aot-swap-out,
--no-pipelined-swap-in for every tiered system). docs/BENCHMARKS.md explains each option.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run from a checkout without installing
from pensieve.bench.cli import add_bench_arguments, bench_async  # noqa: E402

PAPER_GPU_KV_GB = 40.0     # every system's GPU KV cache in the paper (A100-80GB)
DEFAULT_CPU_KV_GB = 64.0   # the paper had 220 GB of host memory per GPU; the H100 machine has 128 GiB

QUICK = dict(rates="2,8", duration=0.0, max_conversations=4, think_time=0.05, max_input_tokens=16,
             max_output_tokens=8, num_gpu_blocks_override=64, num_cpu_blocks=128, bounds="0.05,0.1,0.2,0.5")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_bench_arguments(parser)
    g = parser.add_argument_group("checkpoint and scaling")
    g.add_argument("--model-shape", default=None,
                   help="random-weight checkpoint of a real shape (pensieve.model.random_checkpoint.PRESETS), "
                        "e.g. llama-2-13b-gqa10, opt-13b, llama-3.1-8b")
    g.add_argument("--checkpoint-dir", default=None, help="where to build it (default ~/.cache/pensieve/ckpt/SHAPE)")
    g.add_argument("--checkpoint-dtype", default="bfloat16")
    g.add_argument("--time-scale", type=float, default=1.0,
                   help="multiply the think time and the idle conversations' share of the KV budgets by this (keeps "
                        "the cache pressure of a shorter run): --kv-offloading-size and the part of --gpu-kv-gb above "
                        "--running-kv-gb; explicit --num-*-blocks are not scaled")
    g.add_argument("--running-kv-gb", type=float, default=0.0,
                   help="the GPU KV the running batch needs (GiB), kept whole by --time-scale: the running set does not "
                        "shrink with the think time, only the idle set does (docs/BENCHMARKS.md, 'Budgets that fit')")
    g.add_argument("--quick", action="store_true", help="CPU smoke run: the tiny random Llama, 4 conversations, tiny turns")
    parser.set_defaults(systems="tiered,gpu,stateless", think_time=60.0, out=None)
    return parser


def scaled_gpu_kv_gb(gpu_kv_gb: float, running_kv_gb: float, time_scale: float) -> float:
    """The GPU KV budget of a run whose think time is scaled by `time_scale`: the running batch's KV does not
    depend on the think time (Little's law: requests/s x seconds each), so it stays whole; the idle
    conversations' share (requests/s x think time x context) scales with the think time."""
    if not 0 <= running_kv_gb <= gpu_kv_gb:
        raise SystemExit(f"--running-kv-gb {running_kv_gb} must be within [0, --gpu-kv-gb {gpu_kv_gb}]")
    return running_kv_gb + time_scale * (gpu_kv_gb - running_kv_gb)


def warn_pool_bound(results: dict) -> None:
    """Say which points' batch the GPU pool capped: there the run measures the pool size, not the cache."""
    for system, pts in results.get("points", {}).items():
        for p in pts:
            occ = p.get("occupancy") or {}
            if occ.get("binds") == "gpu_pool":
                print(f"[multiturn] {system} @ {p['rate']:g} conv/s (seed {p.get('seed', 0)}): the running batch "
                      f"filled the GPU pool ({100 * occ['gpu_used_frac']['max']:.0f}% at most, "
                      f"{100 * occ['pool_bound_share']:.0f}% of samples with requests waiting); raise --gpu-kv-gb or "
                      "--running-kv-gb", file=sys.stderr)


def build_checkpoint(shape: str, directory: str | None, dtype_name: str) -> str:
    import torch

    from pensieve.model.random_checkpoint import PRESETS, make_random_checkpoint

    if shape not in PRESETS:
        raise SystemExit(f"unknown --model-shape {shape!r}; known: {', '.join(sorted(PRESETS))}")
    arch = PRESETS[shape][0]
    path = Path(directory or Path(os.environ.get("PENSIEVE_CACHE_DIR") or Path.home() / ".cache" / "pensieve")
                / "ckpt" / shape)
    if not (path / "config.json").exists():
        print(f"[multiturn] building a random {shape} checkpoint in {path} ...", file=sys.stderr)
        t = time.perf_counter()
        device = "cuda" if torch.cuda.is_available() else "cpu"
        make_random_checkpoint(path, arch, size=shape, dtype=getattr(torch, dtype_name), seed=0, device=device)
        print(f"[multiturn] built in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    return str(path)


def main(argv: list[str] | None = None) -> int:
    t_start = time.perf_counter()
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = [sys.executable, "benchmarks/multiturn.py", *argv]
    if args.quick:
        given = {a.split("=")[0] for a in argv if a.startswith("--")}
        for key, value in QUICK.items():
            if "--" + key.replace("_", "-") not in given:
                setattr(args, key, value)
        if "--device" not in given:
            args.device = "cpu"
        if "--dtype" not in given:
            args.dtype = "float32"
        if args.model is None:  # a smoke run of the engine: the tiny random Llama loads in a second
            from pensieve.model.tiny_llama import tiny_llama_path

            args.model = str(tiny_llama_path())
    elif args.model_shape:
        args.model = build_checkpoint(args.model_shape, args.checkpoint_dir, args.checkpoint_dtype)
        if args.gpu_kv_gb is None and args.num_gpu_blocks_override is None:
            args.gpu_kv_gb = PAPER_GPU_KV_GB
        if args.kv_offloading_size is None and args.num_cpu_blocks is None:
            args.kv_offloading_size = DEFAULT_CPU_KV_GB
    scaling = {"time_scale": args.time_scale, "unscaled_think_time_s": args.think_time,
               "unscaled_gpu_kv_gb": args.gpu_kv_gb, "unscaled_cpu_kv_gb": args.kv_offloading_size,
               "running_kv_gb": args.running_kv_gb}
    if args.time_scale != 1.0:
        args.think_time *= args.time_scale
        if args.gpu_kv_gb is not None:
            args.gpu_kv_gb = scaled_gpu_kv_gb(args.gpu_kv_gb, args.running_kv_gb, args.time_scale)
        if args.kv_offloading_size is not None:
            args.kv_offloading_size *= args.time_scale
    scaling["gpu_kv_gb"], scaling["cpu_kv_gb"] = args.gpu_kv_gb, args.kv_offloading_size
    if args.out is None:
        tag = "quick" if args.quick else (args.model_shape or Path(args.model or "demo").name)
        args.out = str(Path("benchmarks/results") / f"{time.strftime('%Y%m%d-%H%M%S')}-{tag}")
    if args.wall_budget is not None:   # the budget is the whole script's: the checkpoint build spent part of it
        args.wall_budget -= time.perf_counter() - t_start
    extra = {"scaling": scaling, "model_shape": args.model_shape, "quick": args.quick}
    try:
        results = asyncio.run(bench_async(args, extra))
    except ValueError as exc:
        print(f"multiturn: {exc}", file=sys.stderr)
        return 2
    Path(args.out, "command.txt").write_text(" ".join(shlex.quote(a) for a in args.argv) + "\n")
    warn_pool_bound(results)
    print(Path(args.out, "summary.md").read_text())
    return 1 if results["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
