"""Server settings: one frozen dataclass built by the CLI (or a test) and passed to build_app."""
from __future__ import annotations

from dataclasses import dataclass

DEFAULT_MAX_BODY_BYTES = 8 << 20   # 8 MiB: ~8x a 128k-token prompt sent as \u-escaped text


@dataclass(frozen=True)
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 8000
    api_keys: tuple[str, ...] = ()              # empty: no authentication
    served_model_names: tuple[str, ...] = ()    # empty: the engine's model_name
    # refuse (503 + Retry-After) while this many requests wait beyond those the engine runs. None:
    # as many as the engine runs at once (max_num_seqs), so a request waits about one request's time
    # at most; past that latency grows and throughput does not (docs/SECURITY.md, measured)
    max_waiting: int | None = None
    retry_after_s: int = 1                      # the Retry-After header of a 503
    max_request_body_bytes: int = DEFAULT_MAX_BODY_BYTES   # larger bodies get 413 before they are read
    metrics_require_auth: bool = False          # /metrics asks for an API key too
    # POST /reset_prefix_cache drops every cached block (between benchmark runs); off by default, since with
    # several API keys any tenant could empty everybody's cache
    enable_cache_reset: bool = False
    max_stored_responses: int = 10_000          # Responses API store; the least recently used are forgotten
    conversation_ttl: float | None = None       # seconds an idle named conversation is remembered
    shutdown_timeout_s: float = 5.0             # in-flight requests get this long, then they end with an error
    # serving as one of several replicas (docs/REPLICAS.md)
    replica_name: str | None = None             # sent back as the x-pensieve-replica header
    kv_events_endpoint: str | None = None       # ZMQ endpoint to publish KV cache events on, e.g. tcp://*:5557
    replica_peers: tuple[tuple[str, str], ...] = ()   # (name, base URL) of the other replicas: stateful turns go there

    def __post_init__(self) -> None:
        if self.max_waiting is not None and self.max_waiting < 0:
            raise ValueError(f"max_waiting must be >= 0, got {self.max_waiting}")
        if self.max_stored_responses < 1:
            raise ValueError(f"max_stored_responses must be >= 1, got {self.max_stored_responses}")
        if any(not key for key in self.api_keys):
            raise ValueError("API keys must be non-empty strings")
        if self.max_request_body_bytes < 1:
            raise ValueError(f"max_request_body_bytes must be >= 1, got {self.max_request_body_bytes}")
        if self.metrics_require_auth and not self.api_keys:
            raise ValueError("metrics_require_auth needs API keys (--api-key)")
        if self.shutdown_timeout_s < 0:
            raise ValueError(f"shutdown_timeout_s must be >= 0, got {self.shutdown_timeout_s}")
