#!/usr/bin/env python
"""Which router keeps each conversation on the replica holding its cache: candidates on the same conversations.

    python benchmarks/replica_routing.py --out benchmarks/results/replicas

Every candidate gets fresh replicas (`pensieve serve` processes started by the serve-replicas launcher) and
serves the same interleaved conversations of the three kinds (pensieve/replicas/workload.py: resent history,
previous_response_id chains, conversation_id chats); one replica alone is the reference. Reported per kind:
the cached share of the later turns, as a share of the reference's, the turns that failed, and whether the
greedy answers equal the reference's. Candidates: vllm-router's policies (cache_aware without and with the
replicas forwarding stateful turns to their owner, kv_aware on the replicas' KV events, consistent_hash,
sticky_least_loaded, round_robin) and sglang-router's cache_aware. Keyed kinds send X-Session-ID.
Writes results.json, summary.md and command.txt. Defaults: the tiny random Llama on the CPU, 3 replicas.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run from a checkout without installing
from pensieve.replicas.launcher import Deployment, RouterConfig, wait_http_ok  # noqa: E402
from pensieve.replicas.workload import KINDS, WorkloadConfig, answers, run_workload, summary  # noqa: E402

CANDIDATES = ("cache_aware", "cache_aware-nopeers", "kv_aware", "consistent_hash", "sticky_least_loaded",
              "round_robin", "sglang-cache_aware")


def _sglang_router(workers: list[str], port: int, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "sglang_router.launch_router", "--worker-urls", *workers, "--policy", "cache_aware", "--host", "127.0.0.1",
           "--port", str(port), "--prometheus-port", str(port + 1), "--log-level", "warn"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    wait_http_ok(f"http://127.0.0.1:{port}/health", 60, proc, log)
    return proc


def run_candidate(name: str, args: argparse.Namespace, cfg: WorkloadConfig, serve: list[str]) -> dict[str, Any]:
    policy = name.split("-")[-1] if name.startswith("sglang") else name.removesuffix("-nopeers")
    n = 1 if name == "one replica" else args.replicas
    router = RouterConfig(policy="round_robin" if name in ("one replica", "sglang-cache_aware") else policy,
                          port=args.port, metrics_port=args.port + 1)
    deployment = Deployment(n, serve, router, replica_port=args.port + 10, kv_events_port=args.port + 30,
                            log_dir=Path(args.out) / "logs" / name.replace(" ", "-"))
    deployment.forward_stateful = name != "cache_aware-nopeers"   # without: nobody forwards a stateful turn
    t0 = time.monotonic()
    with deployment:
        started = time.monotonic() - t0
        url = deployment.workers[0].url if name == "one replica" else deployment.url
        sglang = None
        if name == "sglang-cache_aware":
            sglang = _sglang_router([w.url for w in deployment.workers], args.port + 50,
                                    deployment.log_dir / "sglang-router.log")
            url = f"http://127.0.0.1:{args.port + 50}"
        try:
            t1 = time.monotonic()
            records = asyncio.run(run_workload(url, cfg, model=args.model))
            elapsed = time.monotonic() - t1
        finally:
            if sglang is not None:
                sglang.terminate()
                sglang.wait(timeout=10)
    return {"name": name, "records": records, "summary": summary(records), "startup_s": round(started, 1),
            "run_s": round(elapsed, 1)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="benchmarks/results/replicas")
    p.add_argument("--candidates", default=",".join(CANDIDATES))
    p.add_argument("--replicas", type=int, default=3)
    p.add_argument("--conversations", type=int, default=30, help="per kind")
    p.add_argument("--turns", type=int, default=3)
    p.add_argument("--max-tokens", type=int, default=4)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--model", default=None, help="checkpoint (default: the tiny random Llama of the tests, as measured)")
    p.add_argument("--port", type=int, default=18700, help="router port; replicas and events use the next ports")
    p.add_argument("--serve-args", default="--device cpu --dtype float32 --num-gpu-blocks-override 1024 --num-cpu-blocks 1024 "
                                           "--max-model-len 1024 --log-level warning",
                   help="arguments of every replica's `pensieve serve`")
    args = p.parse_args()
    if args.model is None:
        from pensieve.model.tiny_llama import tiny_llama_path

        args.model = str(tiny_llama_path())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    serve = ([args.model] if args.model else []) + shlex.split(args.serve_args)
    cfg = WorkloadConfig(conversations=args.conversations, turns=args.turns, max_tokens=args.max_tokens,
                         concurrency=args.concurrency, first_words=24, next_words=8, think_s=(0.1, 0.4))
    results = [run_candidate("one replica", args, cfg, serve)]
    for name in args.candidates.split(","):
        results.append(run_candidate(name, args, cfg, serve))
        print(name, json.dumps(results[-1]["summary"]), flush=True)
    reference = results[0]
    ref_answers = answers(reference["records"])
    rows = []
    for res in results:
        mine = answers(res["records"])
        same = sum(1 for k, v in mine.items() if ref_answers.get(k) == v)
        rows.append({"candidate": res["name"], "startup_s": res["startup_s"], "run_s": res["run_s"],
                     "answers_equal": f"{same}/{len(mine)}", **{
                         kind: {**res["summary"][kind], "of_one_replica": round(
                             res["summary"][kind]["cached_share"] / reference["summary"][kind]["cached_share"], 3)
                             if reference["summary"][kind]["cached_share"] else None} for kind in KINDS}})
    (out / "results.json").write_text(json.dumps({"workload": cfg.__dict__, "replicas": args.replicas,
                                                  "serve_args": serve, "rows": rows}, indent=1))
    lines = ["Per kind: cached share of the later turns (as a share of one replica's), turns failed, share of the "
             "answered turns on the busiest replica (1/N: even).", "",
             "| candidate | " + " | ".join(f"{k}" for k in KINDS) + " | answers equal | run s |",
             "|---|" + "---|" * (len(KINDS) + 2)]
    for r in rows:
        cells = [f"{r[k]['cached_share']:.3f} ({r[k]['of_one_replica']:.0%}), "
                 f"{sum(r[k]['failed'].values()) or 0} failed, busiest {r[k]['busiest_replica_share'] or 0:.2f}"
                 for k in KINDS]
        lines.append(f"| {r['candidate']} | " + " | ".join(cells) + f" | {r['answers_equal']} | {r['run_s']} |")
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    (out / "command.txt").write_text(" ".join(shlex.quote(a) for a in [sys.executable.split("/")[-1], *sys.argv]) +
                                     f"\n# host: {os.uname().nodename}, {os.cpu_count()} CPUs\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
