"""`pensieve serve-replicas`: N replicas and vllm-router on one host, and the `serve` flags a replica needs."""
from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path
from typing import Any

from pensieve.replicas.launcher import POLICIES

EPILOG = """examples:
  pensieve serve-replicas --replicas 2                        # two demo-model replicas on the CPU, router on :8000
  pensieve serve-replicas --replicas 4 -- /models/llama-3.1-8b --cache-mode tiered   # one GPU each
Clients talk to the router as to one server. A conversation that continues with previous_response_id
must name its session in an X-Session-ID header from its first turn (docs/REPLICAS.md)."""


def add_replica_serve_arguments(group: Any) -> None:
    """`pensieve serve` flags of a replica in a replicated deployment."""
    group.add_argument("--replica-name", default=None,
                       help="this replica's name ([A-Za-z0-9_-]): in the x-pensieve-replica header and its response ids")
    group.add_argument("--replica-peers", default=None,
                       help="the other replicas, NAME=URL,...: turns continuing their responses are forwarded there")
    group.add_argument("--kv-events-endpoint", default=None,
                       help="publish KV cache events (vLLM's format, ZMQ PUB) here, e.g. tcp://127.0.0.1:5600")


def replica_settings(args: argparse.Namespace) -> dict[str, Any]:
    """ServerSettings fields from the replica flags of `pensieve serve`."""
    name = args.replica_name
    if name is not None and (not name or not all(c.isalnum() or c in "_-" for c in name)):
        raise SystemExit(f"--replica-name must be letters, digits, _ or -: {name!r}")
    peers = []
    for item in (args.replica_peers or "").split(","):
        if item.strip():
            peer, sep, url = item.partition("=")
            if not sep or not url.startswith(("http://", "https://")):
                raise SystemExit(f"--replica-peers takes NAME=http://HOST:PORT items, got {item!r}")
            peers.append((peer.strip(), url.strip().rstrip("/")))
    return {"replica_name": name, "replica_peers": tuple(peers), "kv_events_endpoint": args.kv_events_endpoint}


def add_serve_replicas(sub: Any) -> None:
    from pensieve.cli import HelpFormatter

    p = sub.add_parser("serve-replicas", help="N replicas behind vllm-router on this host",
                       epilog=EPILOG, formatter_class=HelpFormatter)
    p.add_argument("--replicas", type=int, default=2, help="number of replicas (one GPU group each where there are GPUs)")
    p.add_argument("--gpus-per-replica", type=int, default=1, help="GPUs in each replica's group")
    p.add_argument("--host", default="127.0.0.1", help="address of the router and the replicas")
    p.add_argument("--port", type=int, default=8000, help="router port (the one clients use)")
    p.add_argument("--replica-port", type=int, default=8100, help="replica i listens on this port + i")
    p.add_argument("--kv-events-port", type=int, default=5600, help="replica i publishes KV events on this port + i")
    p.add_argument("--router-metrics-port", type=int, default=29000, help="the router's own Prometheus port")
    p.add_argument("--policy", choices=POLICIES, default="cache_aware",
                   help="vllm-router policy: cache_aware (by the longest prefix of the request's tokens; default), "
                        "kv_aware (by the replicas' KV events, sticky per X-Session-ID), others for comparison")
    p.add_argument("--session-ttl", type=int, default=3600, help="seconds an idle session stays on its replica")
    p.add_argument("--log-dir", default=None, help="where each process's log goes (default: a temporary directory)")
    p.add_argument("serve_args", nargs=argparse.REMAINDER,
                   help="after --: arguments of every replica's `pensieve serve` (model, cache flags, ...)")


def _serve_arg(args: list[str], flag: str, default: str) -> str:
    """The value of `flag` among the replicas' serve arguments (`--flag v` or `--flag=v`)."""
    for i, a in enumerate(args):
        if a == flag and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return default


def run_serve_replicas(args: argparse.Namespace) -> int:
    from pensieve.replicas.launcher import Deployment, RouterConfig

    serve_args = [a for a in args.serve_args if a != "--"] if args.serve_args[:1] == ["--"] else list(args.serve_args)
    router = RouterConfig(policy=args.policy, host=args.host, port=args.port, metrics_port=args.router_metrics_port,
                          session_ttl_s=args.session_ttl, block_size=int(_serve_arg(serve_args, "--block-size", "16")),
                          api_key=_serve_arg(serve_args, "--api-key", "") or None)
    deployment = Deployment(args.replicas, serve_args, router, replica_port=args.replica_port,
                            kv_events_port=args.kv_events_port, gpus_per_replica=args.gpus_per_replica,
                            log_dir=Path(args.log_dir) if args.log_dir else None)
    stopping = False

    def on_signal(signum: int, _: Any) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    print(f"starting {args.replicas} replicas and the router (logs in {deployment.log_dir or 'a temporary directory'})",
          flush=True)
    with deployment:
        print(f"Pensieve: {args.replicas} replicas behind vllm-router ({args.policy}) at {deployment.url}/v1 "
              f"(logs: {deployment.log_dir})", flush=True)
        exited: set[int] = set()
        while not stopping:
            for i, proc in enumerate(deployment.procs):
                if i not in exited and proc.poll() is not None:
                    exited.add(i)
                    print(f"replica-{i} exited with {proc.returncode}; the router routes around it", file=sys.stderr)
            router = deployment.router_process.proc if deployment.router_process else None
            if router is not None and router.poll() is not None:
                print(f"the router exited with {router.returncode}", file=sys.stderr)
                return 1
            time.sleep(1.0)
    return 0
