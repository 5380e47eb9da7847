"""The `pensieve` console script: `serve`, `chat` and `bench`."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from pensieve.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig


def _default_model() -> str:
    from pensieve.demo import demo_model_path

    return str(demo_model_path())


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """Engine flags, named like vLLM's where vLLM has them."""
    parser.add_argument("model", nargs="?", default=None,
                        help="checkpoint directory (default: the built-in demo model)")
    g = parser.add_argument_group("engine")
    g.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    g.add_argument("--tensor-parallel-size", "-tp", type=int, default=1,
                   help="shard the model over this many GPUs (one process each; on a CPU, gloo processes)")
    g.add_argument("--dtype", default="auto", choices=("auto", "bfloat16", "float16", "float32"))
    g.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the model's)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--max-model-len", type=int, default=None)
    g.add_argument("--max-num-seqs", type=int, default=256)
    g.add_argument("--max-num-batched-tokens", type=int, default=4096)
    g.add_argument("--enforce-eager", action="store_true", help="disable CUDA graphs")
    g.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                   help="schedule the next decode step while the GPU runs this one (default: on with CUDA)")
    c = parser.add_argument_group("KV cache")
    c.add_argument("--cache-mode", choices=("stateless", "gpu", "tiered"), default="tiered")
    c.add_argument("--block-size", type=int, default=16)
    c.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    c.add_argument("--num-gpu-blocks", type=int, default=None, help="overrides --gpu-memory-utilization")
    c.add_argument("--cpu-cache-gb", type=float, default=None,
                   help="CPU tier size in GB (default: twice the GPU tier, at most 40%% of host memory and 64 GB)")
    c.add_argument("--num-cpu-blocks", type=int, default=None, help="overrides --cpu-cache-gb")
    c.add_argument("--eviction-policy", choices=("retention", "lru"), default="retention")
    c.add_argument("--conversation-ttl", type=float, default=None, help="seconds an idle conversation is kept")
    c.add_argument("--kv-cache-path", default=None,
                   help="directory to load the KV cache from at start and save it to at shutdown (survives restarts)")
    c.add_argument("--kv-cache-strict", action="store_true",
                   help="refuse to start when the saved cache is damaged or foreign (default: log it, start empty)")


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    model = args.model or _default_model()
    return EngineConfig(
        model=ModelConfig(model=model, dtype=args.dtype, max_model_len=args.max_model_len,
                          tokenizer=args.tokenizer, seed=args.seed),
        cache=CacheConfig(block_size=args.block_size, cache_mode=args.cache_mode,
                          gpu_memory_utilization=args.gpu_memory_utilization, num_gpu_blocks=args.num_gpu_blocks,
                          cpu_cache_gb=args.cpu_cache_gb, num_cpu_blocks=args.num_cpu_blocks,
                          eviction_policy=args.eviction_policy, conversation_ttl=args.conversation_ttl,
                          persist_path=args.kv_cache_path, persist_strict=args.kv_cache_strict),
        scheduler=SchedulerConfig(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens),
        device=args.device, enforce_eager=args.enforce_eager, async_scheduling=args.async_scheduling,
        tensor_parallel_size=args.tensor_parallel_size)


def parse_api_keys(values: Sequence[str] | None, env: str | None) -> tuple[str, ...]:
    """`--api-key` may repeat and hold comma lists; PENSIEVE_API_KEY is used when no flag is given."""
    raw = list(values or []) or ([env] if env else [])
    return tuple(dict.fromkeys(k.strip() for item in raw for k in item.split(",") if k.strip()))


def _add_serve(sub: Any) -> None:
    from pensieve.server.settings import DEFAULT_MAX_BODY_BYTES

    p = sub.add_parser("serve", help="run the OpenAI-compatible HTTP server")
    add_engine_arguments(p)
    s = p.add_argument_group("server")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--api-key", action="append", default=None,
                   help="required bearer key; repeat or comma-separate for several (env PENSIEVE_API_KEY)")
    s.add_argument("--served-model-name", nargs="+", default=None, help="model name(s) clients use")
    s.add_argument("--max-stored-responses", type=int, default=10_000)
    s.add_argument("--max-waiting", type=int, default=None,
                   help="refuse new requests (503 + Retry-After) while this many wait beyond those running "
                        "(default: --max-num-seqs; measured in docs/SECURITY.md)")
    s.add_argument("--max-request-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES,
                   help="larger request bodies get 413 before they are read")
    s.add_argument("--metrics-require-auth", action="store_true",
                   help="/metrics asks for an API key too (default: open, like /health)")
    s.add_argument("--shutdown-timeout", type=float, default=5.0,
                   help="seconds in-flight requests get on SIGINT/SIGTERM; then streams end with an error "
                        "event and [DONE], other requests with 503")
    s.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    s.add_argument("--engine-process", action="store_true",
                   help="step the engine in a process of its own (no GIL shared with the HTTP server)")
    from pensieve.replicas.cli import add_replica_serve_arguments

    add_replica_serve_arguments(s)


def _add_chat(sub: Any) -> None:
    p = sub.add_parser("chat", help="interactive terminal chat (in-process engine, or a server with --url)")
    add_engine_arguments(p)
    p.add_argument("--url", default=None, help="base URL of a running server, e.g. http://127.0.0.1:8000/v1")
    p.add_argument("--api-key", default=None, help="key for --url (env PENSIEVE_API_KEY)")
    p.add_argument("--served-model-name", default=None, help="model name to ask a server for (default: its first)")
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.7)


def _served_names(args: argparse.Namespace) -> tuple[str, ...]:
    if args.served_model_name:
        return tuple(args.served_model_name)
    if args.model is None:  # the demo model: a short name first, its path still accepted
        return ("pensieve-demo", _default_model())
    return ()  # the engine's model name


def _start_error(exc: BaseException) -> str | None:
    """The one line to print for a start-up failure the operator can fix (a saved cache or its path)."""
    from pensieve.cache.persist import CacheError

    for err in (exc, exc.__cause__):
        if isinstance(err, CacheError):
            return f"KV cache: {err}"
    return None


def serve(args: argparse.Namespace) -> int:
    from pensieve.engine.async_engine import AsyncEngine
    from pensieve.replicas.cli import replica_settings
    from pensieve.server.app import build_app
    from pensieve.server.serving import serve as serve_app
    from pensieve.server.settings import ServerSettings

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = engine_config_from_args(args)
    try:
        settings = ServerSettings(
            host=args.host, port=args.port,
            api_keys=parse_api_keys(args.api_key, os.environ.get("PENSIEVE_API_KEY")),
            served_model_names=_served_names(args), max_waiting=args.max_waiting,
            max_request_body_bytes=args.max_request_body_bytes, metrics_require_auth=args.metrics_require_auth,
            max_stored_responses=args.max_stored_responses, conversation_ttl=args.conversation_ttl,
            shutdown_timeout_s=args.shutdown_timeout, **replica_settings(args))
    except ValueError as exc:
        print(f"pensieve serve: error: {exc}", file=sys.stderr)
        return 2
    try:
        if args.engine_process:
            from pensieve.engine.engine_process import EngineProcess

            engine = EngineProcess(config)
        else:
            engine = AsyncEngine(config)
    except Exception as exc:
        line = _start_error(exc)
        if line is None:
            raise
        print(f"pensieve serve: error: {line}", file=sys.stderr)
        return 1
    app = build_app(engine, settings)
    print(f"Pensieve serving {settings.served_model_names or engine.model_name} on {engine.device} at "
          f"http://{args.host}:{args.port}/v1", flush=True)
    serve_app(app, args.host, args.port, args.log_level)   # SIGINT/SIGTERM: server/serving.py
    return 0


def _bench(args: argparse.Namespace) -> int:
    from pensieve.bench.cli import run_bench

    return run_bench(args)


def build_parser(with_bench: bool = False) -> argparse.ArgumentParser:
    """`with_bench` imports the benchmark's options (lazily: only `pensieve bench` pays for the import)."""
    parser = argparse.ArgumentParser(prog="pensieve", description="Stateful LLM serving for multi-turn chat.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_serve(sub)
    _add_chat(sub)
    from pensieve.replicas.cli import add_serve_replicas

    add_serve_replicas(sub)
    bench = sub.add_parser("bench", help="multi-turn serving benchmark")
    if with_bench:
        try:
            from pensieve.bench.cli import add_bench_arguments
        except ImportError as exc:  # optional module: say so instead of failing the whole CLI
            bench.set_defaults(bench_missing=str(exc))
        else:
            add_bench_arguments(bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(with_bench=bool(argv) and argv[0] == "bench").parse_args(argv)
    if args.command == "serve":
        return serve(args)
    if args.command == "chat":
        from pensieve.chat import run_chat

        return run_chat(args)
    if args.command == "serve-replicas":
        from pensieve.replicas.cli import run_serve_replicas

        return run_serve_replicas(args)
    if getattr(args, "bench_missing", None):
        print(f"pensieve bench is not available: {args.bench_missing}", file=sys.stderr)
        return 2
    return _bench(args)


if __name__ == "__main__":
    sys.exit(main())
