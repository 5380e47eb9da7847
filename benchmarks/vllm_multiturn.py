#!/usr/bin/env python
r"""vLLM's own multi-turn client against `pensieve serve`, beside our benchmark, on the same conversations.

    python benchmarks/vllm_multiturn.py --client third_party/vllm_multi_turn/benchmark_serving_multi_turn.py \
        --model CKPT --cache-modes tiered,stateless --dataset sharegpt --num-conversations 32 \
        --num-clients 8 --max-active-conversations 32 --max-num-requests 400 --gpu-kv-gb 8 --kv-offloading-size 48 \
        --out runs/vllm-client

The client (`benchmarks/multi_turn/benchmark_serving_multi_turn.py` of vLLM's release source, with its
`bench_dataset.py` and `bench_utils.py` beside it) is not part of this repository: pass its path. For each
cache mode this script
1. writes the conversations (our loaders and presets: real ShareGPT, the synthetic shapes) once, in the
   client's input format (`[{"id", "messages": [{"role", "content"}, ...]}]`), every conversation as whole
   user/assistant pairs (even length: an odd one crashes the client) and every assistant message cut so that
   the model's tokenizer counts exactly the turn's reply length (the client asks for that many tokens);
2. starts `pensieve serve` on loopback with that cache mode and KV budget, runs the client against it, reads
   the server's /metrics before and after (cache hits: the client itself only estimates them);
3. empties the server's cache (POST /reset_prefix_cache: nothing left from the client, no second model load
   and kernel compile) and runs our benchmark (`--systems http --api chat`) on the same file, so both
   clients' numbers come from the same server, model, budget and conversations.
Everything lands in --out: the conversations, each client's log and per-request stats, our results.json per
mode, and `vllm_client.json` / `vllm_client.md` with both side by side.

The client needs aiohttp, numpy, pandas and transformers (its requirements.txt; xlsxwriter only for -e). Where
the client imports `vllm.benchmarks.lib.utils.redact_sensitive_namespace` (it only logs its arguments with it)
and vLLM is not installed, this script puts a stand-in of that one function on the client's path.
"""
from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import shlex
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run from a checkout without installing
from pensieve.bench.backends import blocks_for_budget, kv_bytes_per_token  # noqa: E402
from pensieve.bench.cli import (DATASETS, ConversationSource, add_bench_arguments, bench_async,  # noqa: E402
                                point_seed)
from pensieve.bench.datasets import Conversation  # noqa: E402
from pensieve.bench.metrics import describe  # noqa: E402
from pensieve.bench.workload import WorkloadConfig  # noqa: E402
from pensieve.replicas.launcher import wait_http_ok  # noqa: E402

SERVED_NAME = "pensieve-bench"

# Our own stand-in for the one vLLM helper the client imports (it logs the parsed arguments with it).
_SHIM = '''"""Stand-in written by pensieve's benchmarks/vllm_multiturn.py: vLLM is not installed here."""
import argparse


def redact_sensitive_namespace(namespace, fields):
    values = dict(vars(namespace))
    for name in fields:
        if values.get(name):
            values[name] = "<redacted>"
    return argparse.Namespace(**values)
'''


# ------------------------------------------------------------------------------------------ conversations
FILLER = ("the cache keeps each conversation between turns so a new turn costs little more than its new "
          "tokens while the history stays in memory and the reply streams back one token at a time ")


def fit_text(tokenizer: Any, target: int, text: str | None) -> str:
    """A text the tokenizer counts as `target` tokens: a prefix of `text` (extended with plain filler words when
    it is shorter), cut where decode -> encode gives exactly `target` tokens (the nearest count otherwise:
    a cut can merge with its neighbour)."""
    ids = tokenizer.encode(text, add_special_tokens=False) if text else []
    filler = tokenizer.encode(FILLER, add_special_tokens=False)
    while len(ids) < target + 8:
        ids = ids + filler
    best, best_err = "", None
    for cut in sorted(range(max(1, target - 8), target + 9), key=lambda c: abs(c - target)):
        cand = tokenizer.decode(ids[:cut], skip_special_tokens=True)
        err = abs(len(tokenizer.encode(cand, add_special_tokens=False)) - target)
        if best_err is None or err < best_err:
            best, best_err = cand, err
        if err == 0:
            break
    return best


def client_conversations(convs: list[Conversation], tokenizer: Any) -> list[dict[str, Any]]:
    """Our conversations in the client's input format: user / assistant pairs only (a leading system message
    joins the first user message), the assistant message sized to the turn's reply length."""
    out = []
    for conv in convs:
        messages: list[dict[str, str]] = []
        for i, turn in enumerate(conv.turns):
            user = turn.user_text if turn.user_text is not None else tokenizer.decode(
                list(turn.user_token_ids or ()), skip_special_tokens=True)
            if i == 0 and conv.system:
                user = f"{conv.system}\n\n{user}"
            messages.append({"role": "user", "content": user})
            messages.append({"role": "assistant", "content": fit_text(tokenizer, turn.reply_len, turn.reply_text)})
        out.append({"id": conv.conv_id, "messages": messages})
    return out


# ------------------------------------------------------------------------------------------------ server
class Server:
    """`pensieve serve` in a child process on 127.0.0.1; always stopped by close()."""

    def __init__(self, model: str, cache_mode: str, port: int, extra: list[str], log: Path) -> None:
        self.url = f"http://127.0.0.1:{port}"
        cmd = [sys.executable, "-m", "pensieve.cli", "serve", model, "--host", "127.0.0.1", "--port", str(port),
               "--cache-mode", cache_mode, "--served-model-name", SERVED_NAME, "--enable-cache-reset", *extra]
        self.command = cmd
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]),
                                                                         os.environ.get("PYTHONPATH")])))
        self._log_path = log
        self._log = open(log, "w")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)

    def wait_ready(self, timeout_s: float) -> None:
        wait_http_ok(self.url + "/v1/models", timeout_s, self.proc, self._log_path)

    def metrics(self) -> dict[str, float]:
        from prometheus_client.parser import text_string_to_metric_families

        with urllib.request.urlopen(self.url + "/metrics", timeout=10) as resp:
            text = resp.read().decode()
        out: dict[str, float] = {}
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                if s.name.startswith("pensieve") and not s.name.endswith(("_bucket", "_created")):
                    labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
                    out[f"{s.name}{{{labels}}}" if labels else s.name] = float(s.value)
        return out

    def reset_cache(self) -> None:
        """Empty both cache tiers (the server runs with --enable-cache-reset)."""
        req = urllib.request.Request(self.url + "/reset_prefix_cache", data=b"", method="POST")
        with urllib.request.urlopen(req, timeout=60) as resp:
            if resp.status != 200:
                raise RuntimeError(f"/reset_prefix_cache answered {resp.status}")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)          # graceful: in-flight requests end, the engine stops
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
        self._log.close()


def cache_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Prompt, hit (by tier) and recomputed tokens the server counted between two /metrics reads."""
    def d(key: str) -> float:
        return after.get(key, 0.0) - before.get(key, 0.0)

    prompt = d("pensieve_prompt_tokens_total")
    gpu, cpu = d("pensieve_hit_tokens_total{tier=gpu}"), d("pensieve_hit_tokens_total{tier=cpu}")
    return {"prompt_tokens": prompt, "gpu_hit_tokens": gpu, "cpu_hit_tokens": cpu,
            "recomputed_tokens": d("pensieve_recomputed_tokens_total"),
            "finished_requests": d("pensieve_finished_requests_total"),
            "swapped_out_blocks": d("pensieve_swapped_out_blocks_total"),
            "swapped_in_blocks": d("pensieve_swapped_in_blocks_total"),
            "hit_rate": (gpu + cpu) / prompt if prompt else 0.0}


# ------------------------------------------------------------------------------------------------ client
def client_env(client: Path, shim_dir: Path) -> dict[str, str]:
    """The client's environment: its own folder first on the path (bench_dataset, bench_utils), and the
    stand-in for vLLM's helper when the client imports vLLM and vLLM is not installed."""
    paths = [str(client.parent)]
    source = client.read_text()
    if ("from vllm" in source or "import vllm" in source) and importlib.util.find_spec("vllm") is None:
        pkg = shim_dir / "vllm" / "benchmarks" / "lib"
        pkg.mkdir(parents=True, exist_ok=True)
        for d in (shim_dir / "vllm", shim_dir / "vllm" / "benchmarks", pkg):
            (d / "__init__.py").touch()
        (pkg / "utils.py").write_text(_SHIM)
        paths.append(str(shim_dir))
    return dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [*paths, os.environ.get("PYTHONPATH")])),
                TOKENIZERS_PARALLELISM="false")


def client_command(args: argparse.Namespace, client: Path, conv_file: Path, url: str, stats: Path | None) -> list[str]:
    cmd = [sys.executable, str(client), "-i", str(conv_file), "-m", args.model, "--served-model-name", SERVED_NAME,
           "-u", url, "-p", str(args.num_clients), "-k", str(args.max_active_conversations), "--seed", str(args.seed),
           "--request-timeout-sec", str(args.request_timeout)]
    if args.max_num_requests:
        cmd += ["-n", str(args.max_num_requests)]
    if stats is not None:
        cmd += ["--stats-json-output", str(stats)]
    return cmd + list(args.client_arg)


def summarize_client(stats: list[dict[str, Any]]) -> dict[str, Any]:
    """The client's per-request stats (ms) in our units: requests/s over the span from the first send to the
    last finish, TTFT / TPOT / latency / normalized latency (s, s/token), and TTFT by turn number."""
    if not stats:
        return {"num_requests": 0}
    start = min(s["start_time_ms"] for s in stats)
    end = max(s["start_time_ms"] + s["latency_ms"] for s in stats)
    span = (end - start) / 1000.0
    by_turn: dict[str, list[float]] = {}
    for s in stats:
        by_turn.setdefault(str((int(s["input_num_turns"]) + 1) // 2), []).append(s["ttft_ms"] / 1000.0)
    return {
        "num_requests": len(stats), "span_s": span, "throughput_rps": len(stats) / span if span > 0 else 0.0,
        "ttft": describe([s["ttft_ms"] / 1000.0 for s in stats]),
        "tpot": describe([s["tpot_ms"] / 1000.0 for s in stats]),
        "e2e": describe([s["latency_ms"] / 1000.0 for s in stats]),
        "normalized_latency": describe([s["latency_ms"] / 1000.0 / max(1, s["output_num_tokens"]) for s in stats]),
        "output_tokens": sum(int(s["output_num_tokens"]) for s in stats),
        "input_tokens_mean": sum(int(s["input_num_tokens"]) for s in stats) / len(stats),
        "ttft_by_turn": {k: describe(v) for k, v in sorted(by_turn.items(), key=lambda kv: int(kv[0]))},
    }


def parse_client_stdout(text: str) -> dict[str, float]:
    """`runtime_sec = X` / `requests_per_sec = Y` of the client's summary (its first block)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        key, sep, value = line.strip().partition(" = ")
        if sep and key in ("runtime_sec", "requests_per_sec") and key not in out:
            try:
                out[key] = float(value)
            except ValueError:
                pass
    return out


def run_client(args: argparse.Namespace, client: Path, conv_file: Path, url: str, out: Path, mode: str) -> dict:
    supports_json = "--stats-json-output" in client.read_text()
    stats_file = out / f"vllm_stats_{mode}.json" if supports_json else None
    cmd = client_command(args, client, conv_file, url, stats_file)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=client_env(client, out / "_shim"), cwd=client.parent, capture_output=True,
                              text=True, timeout=args.client_timeout)
        rc, text = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as exc:
        rc = -1
        text = f"{exc.stdout or ''}{exc.stderr or ''}\n[vllm_multiturn] the client ran past {args.client_timeout} s"
        text = text if isinstance(text, str) else text.decode(errors="replace")
    wall = time.perf_counter() - t0
    (out / f"vllm_client_{mode}.log").write_text(" ".join(shlex.quote(c) for c in cmd) + "\n\n" + text)
    res: dict[str, Any] = {"command": cmd, "returncode": rc, "wall_s": wall, "stdout_summary": parse_client_stdout(text)}
    if stats_file is not None and stats_file.exists():
        res["summary"] = summarize_client(json.loads(stats_file.read_text()))
    return res


# ------------------------------------------------------------------------------------------------ driver
def write_conversations(args: argparse.Namespace, out: Path) -> tuple[Path, dict[str, Any]]:
    """Draw --num-conversations from the workload (our loaders / presets, seeded) and write the client's file."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    bench = bench_namespace(args, out)
    source = ConversationSource(bench, tokenizer)
    cfg = WorkloadConfig(rate=1.0, duration=None, max_conversations=args.num_conversations,
                         seed=point_seed(args.seed, 1.0))
    convs = source.for_point(cfg, "c")
    data = client_conversations(convs, tokenizer)
    path = out / "conversations.json"
    path.write_text(json.dumps(data, ensure_ascii=False))
    turns = sum(len(c["messages"]) // 2 for c in data)
    return path, {"conversations": len(data), "turns": turns, "source": source.describe(), "dataset": args.dataset,
                  "max_context": source.max_context}


def bench_namespace(args: argparse.Namespace, out: Path, *extra: str) -> argparse.Namespace:
    """Our benchmark's options: the workload flags given here, then `extra`."""
    parser = argparse.ArgumentParser()
    add_bench_arguments(parser)
    base = ["--dataset", args.dataset, "--seed", str(args.seed), "--no-progress", "--out", str(out)]
    for flag, value in (("--dataset-path", args.dataset_path), ("--max-input-tokens", args.max_input_tokens),
                        ("--max-output-tokens", args.max_output_tokens), ("--max-context", args.max_context)):
        if value is not None:
            base += [flag, str(value)]
    ns = parser.parse_args(base + list(extra))
    ns.argv = [sys.executable, "benchmarks/vllm_multiturn.py", *sys.argv[1:]]
    return ns


def server_extra(args: argparse.Namespace, mode: str) -> list[str]:
    extra = ["--max-num-seqs", str(args.max_num_seqs), "--max-num-batched-tokens", str(args.max_num_batched_tokens)]
    if args.device != "auto":
        extra += ["--device", args.device]
    if args.dtype != "auto":
        extra += ["--dtype", args.dtype]
    if args.max_model_len:
        extra += ["--max-model-len", str(args.max_model_len)]
    if args.gpu_kv_gb is not None or args.kv_offloading_size is not None:
        per_token = kv_bytes_per_token(args.model, args.dtype, "cpu" if args.device == "cpu" else "cuda")
        if args.gpu_kv_gb is not None:
            extra += ["--num-gpu-blocks-override", str(blocks_for_budget(args.gpu_kv_gb, per_token, 16))]
        if args.kv_offloading_size is not None and mode == "tiered":
            extra += ["--num-cpu-blocks", str(blocks_for_budget(args.kv_offloading_size, per_token, 16))]
    return extra + shlex.split(args.server_args)


def with_server(args: argparse.Namespace, mode: str, out: Path, fn):
    server = Server(args.model, mode, args.port, server_extra(args, mode), out / f"serve_{mode}.log")
    try:
        server.wait_ready(args.server_timeout)
        return fn(server), server.command
    finally:
        server.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--client", required=True, help="path to vLLM's benchmark_serving_multi_turn.py")
    ap.add_argument("--model", required=True, help="checkpoint directory (its tokenizer is the client's)")
    ap.add_argument("--cache-modes", default="tiered,stateless")
    ap.add_argument("--out", required=True)
    ap.add_argument("--port", type=int, default=8391)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--max-model-len", type=int, default=None)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-num-batched-tokens", type=int, default=4096)
    ap.add_argument("--gpu-kv-gb", type=float, default=None, help="GPU KV budget (-> serve --num-gpu-blocks-override)")
    ap.add_argument("--kv-offloading-size", type=float, default=None, metavar="GIB",
                    help="CPU tier of tiered in GiB (-> serve --num-cpu-blocks)")
    ap.add_argument("--server-args", default="", help="more `pensieve serve` flags, one string")
    ap.add_argument("--server-timeout", type=float, default=300.0, help="seconds a server may take to start")
    w = ap.add_argument_group("conversations (our loaders and presets)")
    w.add_argument("--dataset", choices=DATASETS, default="sharegpt")
    w.add_argument("--dataset-path", default=None)
    w.add_argument("--num-conversations", type=int, default=32)
    w.add_argument("--seed", type=int, default=0)
    w.add_argument("--max-input-tokens", type=int, default=None)
    w.add_argument("--max-output-tokens", type=int, default=None)
    w.add_argument("--max-context", type=int, default=None)
    c = ap.add_argument_group("vLLM's client")
    c.add_argument("--num-clients", type=int, default=4)
    c.add_argument("--max-active-conversations", type=int, default=16)
    c.add_argument("--max-num-requests", type=int, default=None, help="total requests (all clients)")
    c.add_argument("--request-timeout", type=int, default=600)
    c.add_argument("--client-timeout", type=float, default=600.0, help="seconds the client may run")
    c.add_argument("--client-arg", action="append", default=[], help="more client flags (repeatable)")
    o = ap.add_argument_group("our benchmark on the same conversations (0 rate: skip)")
    o.add_argument("--ours-rate", type=float, default=1.0, help="conversations per second")
    o.add_argument("--ours-think-time", type=float, default=1.0)
    o.add_argument("--ours-time-limit", type=float, default=None)
    args = ap.parse_args(argv)
    client = Path(args.client).resolve()
    if not client.is_file():
        ap.error(f"--client {client} is not a file")
    if args.max_num_requests is not None and args.num_conversations > args.max_active_conversations:
        # The client queues every conversation for its worker processes; with a request limit the workers stop
        # while some are still queued, and the queue's feeder thread, holding them, blocks the client's exit
        # when they are large (long sessions on the H100: every request answered, then no report).
        ap.error(f"with --max-num-requests, --num-conversations ({args.num_conversations}) must not exceed "
                 f"--max-active-conversations ({args.max_active_conversations}): vLLM's client hangs at exit "
                 f"on conversations still queued")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    conv_file, conv_info = write_conversations(args, out)
    print(f"[vllm_multiturn] {conv_info['conversations']} conversations, {conv_info['turns']} turns -> {conv_file}",
          file=sys.stderr)
    report: dict[str, Any] = {"conversations": conv_info, "modes": {}, "client": str(client)}
    for mode in [m.strip() for m in args.cache_modes.split(",") if m.strip()]:
        entry: dict[str, Any] = {}
        report["modes"][mode] = entry

        def ours_run(server: Server) -> dict[str, Any]:
            extra = ["--systems", "http", "--url", server.url, "--api", "chat", "--tokenizer", args.model,
                     "--dataset", "sharegpt", "--dataset-path", str(conv_file), "--rates", f"{args.ours_rate:g}",
                     "--max-conversations", str(conv_info["conversations"]), "--duration", "0",
                     "--think-time", str(args.ours_think_time), "--max-context", str(conv_info["max_context"]),
                     "--out", str(out / f"ours_{mode}")]
            if args.ours_time_limit:
                extra += ["--time-limit", str(args.ours_time_limit)]
            ns = bench_namespace(args, out, *extra)
            ns.max_input_tokens = ns.max_output_tokens = None   # the file is already clipped and sized
            results = asyncio.run(bench_async(ns))
            pt = results["points"].get("http", [{}])[0]
            return {"summary": pt.get("summary"), "occupancy": pt.get("occupancy"), "errors": results["errors"]}

        def both(server: Server) -> None:
            before = server.metrics()
            try:
                entry["vllm_client"] = run_client(args, client, conv_file, server.url, out, mode)
                entry["vllm_client"]["server_cache"] = cache_delta(before, server.metrics())
            except Exception as exc:  # our run still gets its turn
                entry["vllm_client"] = {"error": f"{type(exc).__name__}: {exc}"}
            _print_client(mode, entry["vllm_client"])
            write_report(report, out)         # kept even if a later step runs out of time
            if args.ours_rate > 0:
                try:
                    server.reset_cache()      # ours starts cold, as the client did, on the same warm server
                    entry["ours"] = ours_run(server)
                except Exception as exc:
                    entry["ours"] = {"error": f"{type(exc).__name__}: {exc}"}

        try:
            _, entry["server_command"] = with_server(args, mode, out, both)
        except Exception as exc:  # one mode failing must not lose the others
            entry.setdefault("vllm_client", {"error": f"{type(exc).__name__}: {exc}"})
        write_report(report, out)
    print((out / "vllm_client.md").read_text())
    ok = all(e.get("vllm_client", {}).get("returncode") == 0 for e in report["modes"].values())
    return 0 if ok else 1


def write_report(report: dict[str, Any], out: Path) -> None:
    (out / "vllm_client.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (out / "vllm_client.md").write_text(markdown(report))


def _print_client(mode: str, res: dict[str, Any]) -> None:
    s = res.get("summary") or {}
    print(f"[vllm_multiturn] {mode}: client rc {res.get('returncode')}, {s.get('num_requests', '?')} requests, "
          f"{s.get('throughput_rps', 0):.3f} req/s, TTFT mean {((s.get('ttft') or {}).get('mean') or 0):.3f} s, "
          f"server hit rate {100 * res.get('server_cache', {}).get('hit_rate', 0):.1f}%"
          + (f", error {res['error']}" if "error" in res else ""), file=sys.stderr)


def _f(v: Any, digits: int = 3) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def markdown(report: dict[str, Any]) -> str:
    c = report["conversations"]
    lines = ["# vLLM's multi-turn client and ours against `pensieve serve`", "",
             f"{c['conversations']} conversations ({c['turns']} turns) of `{c['dataset']}`, the same file for both "
             "clients; each client against a fresh server of each cache mode.", "",
             "| cache mode | client | requests | req/s | TTFT mean (s) | TTFT P90 | TPOT mean (s) | norm lat mean "
             "(s/tok) | norm lat P90 | server hit rate |", "|---|---|---|---|---|---|---|---|---|---|"]
    for mode, e in report["modes"].items():
        v = e.get("vllm_client", {})
        s = v.get("summary") or {}
        if s.get("num_requests"):
            lines.append(f"| {mode} | vLLM | {s['num_requests']} | {_f(s['throughput_rps'])} | {_f(s['ttft']['mean'])} | "
                         f"{_f(s['ttft']['p90'])} | {_f(s['tpot']['mean'], 4)} | {_f(s['normalized_latency']['mean'], 4)}"
                         f" | {_f(s['normalized_latency']['p90'], 4)} | {100 * v['server_cache']['hit_rate']:.1f}% |")
        else:
            lines.append(f"| {mode} | vLLM | - | {_f(v.get('stdout_summary', {}).get('requests_per_sec'))} | - | - | - "
                         f"| - | - | {v.get('error', 'rc ' + str(v.get('returncode')))} |")
        o = (e.get("ours") or {}).get("summary")
        if o:
            lines.append(f"| {mode} | ours | {o['num_requests']} | {_f(o['throughput_rps'])} | {_f(o['ttft']['mean'])} | "
                         f"{_f(o['ttft']['p90'])} | {_f(o['tpot']['mean'], 4)} | {_f(o['normalized_latency']['mean'], 4)}"
                         f" | {_f(o['normalized_latency']['p90'], 4)} | {100 * o['cache']['hit_rate']:.1f}% |")
    lines += ["", "TTFT mean (s) by turn number:", ""]
    for mode, e in report["modes"].items():
        vt = ((e.get("vllm_client") or {}).get("summary") or {}).get("ttft_by_turn") or {}
        ot = (((e.get("ours") or {}).get("summary") or {}).get("by_turn") or {}).get("per_turn") or {}
        turns = sorted(set(vt) | set(ot), key=int)[:12]
        if turns:
            lines += [f"| {mode} | " + " | ".join(turns) + " |", "|---|" + "---|" * len(turns),
                      "| vLLM | " + " | ".join(_f((vt.get(t) or {}).get("mean")) for t in turns) + " |",
                      "| ours | " + " | ".join(_f(((ot.get(t) or {}).get("ttft") or {}).get("mean")) for t in turns)
                      + " |", ""]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
