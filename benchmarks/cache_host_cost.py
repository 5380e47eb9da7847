#!/usr/bin/env python
"""Host time of admitting a sequence into full cache tiers (no GPU: the KV cache manager alone).

    python benchmarks/cache_host_cost.py [--gpu-blocks 4849] [--cpu-blocks 7208] [--sizes 64,256,512]

The defaults are the real-ShareGPT run's pools (Llama-2-13B-GQA10, 16-token blocks: 14.8 GiB of GPU KV and
22 GiB of CPU tier). Both tiers are first filled with idle conversations of 40 blocks; each admission of N new
blocks then evicts N GPU blocks, each copied to the CPU tier over its least valuable block. Prints the median
of 5 admissions per size, in ms; the scheduler pays this on the host before the step that admits the sequence.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run from a checkout without installing
from pensieve.cache.manager import KVCacheManager  # noqa: E402
from pensieve.cache.policy import RetentionValuePolicy  # noqa: E402
from pensieve.config import CacheConfig  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gpu-blocks", type=int, default=4849)
    ap.add_argument("--cpu-blocks", type=int, default=7208)
    ap.add_argument("--sizes", default="64,256,512", help="blocks per admission")
    args = ap.parse_args()
    now = [0.0]
    block_size = 16
    cfg = CacheConfig(block_size=block_size, cache_mode="tiered")
    kv = KVCacheManager(cfg, args.gpu_blocks, args.cpu_blocks, RetentionValuePolicy(block_size), lambda: now[0])
    conversations = iter(range(1 << 62))

    def admit(num_blocks: int) -> None:
        conv = next(conversations)
        keys = [(conv, i) for i in range(num_blocks)]
        adm = kv.admit(keys, num_blocks * block_size, reserve=0)
        for i in range(num_blocks):
            kv.commit_block(adm.block_table, i, keys[i])
        kv.take_plan()
        kv.end_step()
        kv.release(adm.block_table)

    while kv.cpu.num_free > 0:
        now[0] += 0.01
        admit(40)
    print(f"tiers full: {args.gpu_blocks} GPU and {args.cpu_blocks} CPU blocks")
    print("| blocks admitted | host ms (median of 5) |\n|---|---|")
    for size in (int(s) for s in args.sizes.split(",")):
        times = []
        for _ in range(5):
            now[0] += 0.01
            start = time.perf_counter()
            admit(size)
            times.append(time.perf_counter() - start)
        print(f"| {size} | {1e3 * statistics.median(times):.2f} |")


if __name__ == "__main__":
    main()
