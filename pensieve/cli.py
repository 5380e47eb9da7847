"""The `pensieve` console script: `serve`, `chat` and `bench`.

One concept has one flag in all three commands, spelled as vLLM spells it wherever vLLM has the concept
(tests/server/test_cli.py holds them to it); --help shows every default.
"""
from __future__ import annotations

import argparse
import copy
import logging
import os
import socket
import sys
from collections.abc import Sequence
from typing import Any

from pensieve.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from pensieve.demo import DEMO_SERVED_NAME
from pensieve.errors import CheckpointError, UsageError


MODEL_HELP = "checkpoint: an HF directory or a .gguf file (default: the demo model, SmolLM2-135M-Instruct)"


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help shows every option's default (options without help text too), unless its text says it;
    descriptions and epilogs (examples) keep their lines."""

    def _format_action(self, action: argparse.Action) -> str:
        if action.help is None and action.default not in (None, False, argparse.SUPPRESS):
            action = copy.copy(action)
            action.help = "(default: %(default)s)"
        return super()._format_action(action)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default in (None, False, argparse.SUPPRESS) or "default" in text:
            return text
        return super()._get_help_string(action)


def default_model() -> str:
    from pensieve.demo import demo_gguf_path

    return str(demo_gguf_path())


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """MODEL as vLLM takes it: a positional, or --model (one of them)."""
    parser.add_argument("model", nargs="?", default=None, metavar="MODEL", help=MODEL_HELP)
    parser.add_argument("--model", dest="model_option", default=None, metavar="MODEL",
                        help="the same as the positional MODEL")


def resolve_model_argument(args: argparse.Namespace) -> None:
    option = getattr(args, "model_option", None)
    if option and args.model and option != args.model:
        raise UsageError(f"two models given: {args.model} and --model {option}")
    args.model = args.model or option


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """Engine flags, named like vLLM's where vLLM has the concept (pensieve bench uses the same names)."""
    add_model_arguments(parser)
    g = parser.add_argument_group("engine")
    g.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto", help="where the model runs")
    g.add_argument("--tensor-parallel-size", "-tp", type=int, default=1,
                   help="shard the model over this many GPUs (one process each; on a CPU, gloo processes)")
    g.add_argument("--dtype", default="auto", choices=("auto", "bfloat16", "float16", "float32"),
                   help="auto: the checkpoint's on CUDA (bfloat16 if it names none), float32 on the CPU")
    g.add_argument("--tokenizer", default=None, help="tokenizer directory or .gguf (default: the model's)")
    g.add_argument("--seed", type=int, default=0, help="seed of sampling without a per-request seed")
    g.add_argument("--max-model-len", type=int, default=None, help="context length (default: the model's)")
    g.add_argument("--max-num-seqs", type=int, default=256, help="most sequences in one step")
    g.add_argument("--max-num-batched-tokens", type=int, default=4096, help="most tokens in one step")
    g.add_argument("--enforce-eager", action="store_true", help="disable CUDA graphs")
    g.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                   help="schedule the next decode step while the GPU runs this one (default: on with CUDA)")
    c = parser.add_argument_group("KV cache")
    c.add_argument("--cache-mode", choices=("stateless", "gpu", "tiered"), default=None,
                   help="tiered: GPU + CPU tiers; gpu: reuse in GPU memory only (vLLM's and SGLang's prefix "
                        "caches); stateless: no reuse across requests (default: tiered)")
    c.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=None,
                   help="vLLM's switch: --no-enable-prefix-caching is --cache-mode stateless, "
                        "--enable-prefix-caching any other mode (default: on)")
    c.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    c.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                   help="share of GPU memory for weights, activations and the GPU tier")
    c.add_argument("--num-gpu-blocks-override", type=int, default=None,
                   help="GPU-tier blocks, instead of sizing by --gpu-memory-utilization")
    c.add_argument("--kv-offloading-size", type=float, default=None, metavar="GIB",
                   help="CPU tier size in GiB (default: twice the GPU tier, at most 40%% of free host memory "
                        "and 64 GB)")
    c.add_argument("--num-cpu-blocks", type=int, default=None, help="CPU-tier blocks, instead of --kv-offloading-size")
    c.add_argument("--eviction-policy", choices=("retention", "lru"), default="retention",
                   help="which cached blocks go first: the paper's retention value, or least recently used")
    c.add_argument("--conversation-ttl", type=float, default=None, help="seconds an idle conversation is kept "
                                                                       "(default: until evicted)")
    c.add_argument("--kv-cache-path", default=None,
                   help="directory to load the KV cache from at start and save it to at shutdown (survives restarts)")
    c.add_argument("--kv-cache-strict", action="store_true",
                   help="refuse to start when the saved cache is damaged or foreign (default: log it, start empty)")


def cache_mode(args: argparse.Namespace) -> str:
    """--cache-mode, with vLLM's --[no-]enable-prefix-caching mapped onto it."""
    mode, prefix = args.cache_mode, args.enable_prefix_caching
    if prefix is False:
        if mode not in (None, "stateless"):
            raise UsageError(f"--no-enable-prefix-caching contradicts --cache-mode {mode}")
        return "stateless"
    if prefix and mode == "stateless":
        raise UsageError("--enable-prefix-caching contradicts --cache-mode stateless")
    return mode or "tiered"


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    resolve_model_argument(args)
    model = args.model or default_model()
    return EngineConfig(
        model=ModelConfig(model=model, dtype=args.dtype, max_model_len=args.max_model_len,
                          tokenizer=args.tokenizer, seed=args.seed),
        cache=CacheConfig(block_size=args.block_size, cache_mode=cache_mode(args),
                          gpu_memory_utilization=args.gpu_memory_utilization,
                          num_gpu_blocks=args.num_gpu_blocks_override,
                          cpu_cache_gb=args.kv_offloading_size, num_cpu_blocks=args.num_cpu_blocks,
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

    p = sub.add_parser("serve", help="run the OpenAI-compatible HTTP server", formatter_class=HelpFormatter)
    add_engine_arguments(p)
    s = p.add_argument_group("server")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on")
    s.add_argument("--port", type=int, default=8000, help="port to listen on")
    s.add_argument("--api-key", action="append", default=None,
                   help="required bearer key; repeat or comma-separate for several (env PENSIEVE_API_KEY)")
    s.add_argument("--served-model-name", nargs="+", default=None,
                   help="model name(s) clients use (default: the model's path; the demo model's is "
                        f"{DEMO_SERVED_NAME})")
    s.add_argument("--max-stored-responses", type=int, default=10_000, help="Responses API objects kept")
    s.add_argument("--max-waiting", type=int, default=None,
                   help="refuse new requests (503 + Retry-After) while this many wait beyond those running "
                        "(default: --max-num-seqs; measured in docs/SECURITY.md)")
    s.add_argument("--max-request-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES,
                   help="larger request bodies get 413 before they are read")
    s.add_argument("--metrics-require-auth", action="store_true",
                   help="/metrics asks for an API key too (default: open, like /health)")
    s.add_argument("--enable-cache-reset", action="store_true",
                   help="serve POST /reset_prefix_cache, which drops every cached block (for benchmarks; "
                        "any API key may call it)")
    s.add_argument("--shutdown-timeout", type=float, default=5.0,
                   help="seconds in-flight requests get on SIGINT/SIGTERM; then streams end with an error "
                        "event and [DONE], other requests with 503")
    s.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"),
                   help="of the server's and the engine's logs")
    s.add_argument("--engine-process", action="store_true",
                   help="step the engine in a process of its own (no GIL shared with the HTTP server)")
    from pensieve.replicas.cli import add_replica_serve_arguments

    add_replica_serve_arguments(s)


def _add_chat(sub: Any) -> None:
    p = sub.add_parser("chat", help="interactive terminal chat (in-process engine, or a server with --url)",
                       formatter_class=HelpFormatter)
    add_engine_arguments(p)
    p.add_argument("--url", default=None, help="base URL of a running server, e.g. http://127.0.0.1:8000/v1")
    p.add_argument("--api-key", default=None, help="key for --url (env PENSIEVE_API_KEY)")
    p.add_argument("--served-model-name", default=None, help="model name to ask a server for (default: its first)")
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--max-tokens", type=int, default=256, help="reply length limit")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (0: greedy)")


def _served_names(args: argparse.Namespace) -> tuple[str, ...]:
    if args.served_model_name:
        return tuple(args.served_model_name)
    if args.model is None:  # the demo model: its short name first, its path still accepted
        return (DEMO_SERVED_NAME, default_model())
    return ()  # the engine's model name


def listening_socket(host: str, port: int) -> socket.socket:
    """The server's socket, bound before the model loads: a port in use fails at once, in one line."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: TIME_WAIT only, never a live listener
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock


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
            enable_cache_reset=args.enable_cache_reset,
            max_stored_responses=args.max_stored_responses, conversation_ttl=args.conversation_ttl,
            shutdown_timeout_s=args.shutdown_timeout, **replica_settings(args))
    except ValueError as exc:
        print(f"pensieve serve: error: {exc}", file=sys.stderr)
        return 2
    sock = listening_socket(args.host, args.port)
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
    print(f"Pensieve serving {', '.join(settings.served_model_names[:1]) or engine.model_name} on {engine.device} "
          f"at http://{args.host}:{args.port}/v1", flush=True)
    serve_app(app, args.host, args.port, args.log_level, sockets=[sock])   # SIGINT/SIGTERM: server/serving.py
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
    bench = sub.add_parser("bench", help="multi-turn serving benchmark", formatter_class=HelpFormatter)
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
    try:
        return _run(args)
    except (UsageError, CheckpointError) as exc:  # the user's to fix: one line, no traceback
        print(f"pensieve {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C while the model loads
        return 130


def _run(args: argparse.Namespace) -> int:
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
