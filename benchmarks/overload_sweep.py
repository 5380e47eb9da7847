"""Concurrency sweep against a real `pensieve serve`: where does latency run away, and does the
waiting-queue bound (`--max-waiting`) shed load (503 + Retry-After) before it does?

Starts the server in a subprocess with the given flags, then for each concurrency C runs C closed-loop
clients (the real `openai` AsyncOpenAI client, no retries of its own) for `--duration` seconds; a
client refused with 503 sleeps the Retry-After it was given and tries again. Reports per C: completed
requests/s, generated tokens/s, latency p50/p99 of the completed ones, and the refusals.

    python benchmarks/overload_sweep.py --concurrency 16,64,256,512 --duration 30 \\
        --server-args "--device cpu --dtype float32 --max-waiting 100000" --out /tmp/sweep.json
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run from a checkout without installing
from pensieve.replicas.launcher import wait_http_ok  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(server_args: str, port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "pensieve.cli", "serve", *shlex.split(server_args), "--port", str(port),
           "--log-level", "warning"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "PENSIEVE_API_KEY": ""})
    try:
        wait_http_ok(f"http://127.0.0.1:{port}/health", 300, proc)
    except (RuntimeError, TimeoutError):
        proc.kill()
        raise
    return proc


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


async def _point(base: str, concurrency: int, duration: float, max_tokens: int, seed: int) -> dict:
    from openai import APIStatusError, AsyncOpenAI

    client = AsyncOpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0, timeout=600,
                         http_client=None)
    model = (await client.models.list()).data[0].id
    latencies: list[float] = []
    tokens = refused = errors = 0
    stop_at = time.monotonic() + duration

    async def one_client(i: int) -> None:
        nonlocal tokens, refused, errors
        rng = random.Random(seed * 10_000 + i)
        while time.monotonic() < stop_at:
            words = " ".join(rng.choice(("cache", "turn", "token", "block", "tier", "GPU")) for _ in range(20))
            start = time.monotonic()
            try:
                resp = await client.chat.completions.create(
                    model=model, messages=[{"role": "user", "content": words}], max_tokens=max_tokens,
                    temperature=0, extra_body={"ignore_eos": True})
            except APIStatusError as exc:
                if exc.status_code == 503:
                    refused += 1
                    await asyncio.sleep(float(exc.response.headers.get("retry-after", "1")))
                    continue
                errors += 1
                continue
            if time.monotonic() <= stop_at:   # a request that ended after the window is not counted
                latencies.append(time.monotonic() - start)
                tokens += resp.usage.completion_tokens

    began = time.monotonic()
    await asyncio.gather(*(one_client(i) for i in range(concurrency)))
    waited = time.monotonic() - began
    await client.close()
    return {"concurrency": concurrency, "duration_s": duration, "completed": len(latencies),
            "requests_per_s": len(latencies) / duration, "tokens_per_s": tokens / duration,
            "latency_p50_s": _pct(latencies, 0.5), "latency_p99_s": _pct(latencies, 0.99),
            "refused_503": refused, "errors": errors, "drain_s": waited - duration}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--concurrency", default="8,16,32,64,128,256,512", help="comma-separated client counts")
    p.add_argument("--duration", type=float, default=30.0, help="seconds per concurrency level")
    p.add_argument("--max-tokens", type=int, default=32, help="tokens generated per request")
    p.add_argument("--model", default=None,
                   help="checkpoint to serve (default: the tiny random Llama of the tests, as measured)")
    p.add_argument("--server-args", default="--device cpu --dtype float32", help="more flags for `pensieve serve` (quoted)")
    p.add_argument("--url", default=None, help="sweep a server already running there instead of starting one")
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    args = p.parse_args()
    if args.model is None:
        from pensieve.model.tiny_llama import tiny_llama_path

        args.model = str(tiny_llama_path())

    proc = None
    if args.url is None:
        port = _free_port()
        proc = _start(f"{shlex.quote(args.model)} {args.server_args}", port)
        base = f"http://127.0.0.1:{port}"
    else:
        base = args.url.rstrip("/").removesuffix("/v1")
    rows = []
    try:
        print(f"{'C':>5} {'req/s':>7} {'tok/s':>7} {'p50 s':>7} {'p99 s':>7} {'503s':>6} {'err':>4}", flush=True)
        for seed, c in enumerate(int(x) for x in args.concurrency.split(",")):
            row = asyncio.run(_point(base, c, args.duration, args.max_tokens, seed))
            rows.append(row)
            fmt = lambda v: f"{v:7.2f}" if v is not None else "      -"  # noqa: E731
            print(f"{c:5d} {row['requests_per_s']:7.2f} {row['tokens_per_s']:7.1f} {fmt(row['latency_p50_s'])} "
                  f"{fmt(row['latency_p99_s'])} {row['refused_503']:6d} {row['errors']:4d}", flush=True)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(60)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"server_args": args.server_args, "max_tokens": args.max_tokens, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
