"""Server settings: one frozen dataclass built by the CLI (or a test) and passed to build_app."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 8000
    api_keys: tuple[str, ...] = ()              # empty: no authentication
    served_model_names: tuple[str, ...] = ()    # empty: the engine's model_name
    max_waiting: int = 4096                     # refuse (503) while this many requests wait in the engine
    retry_after_s: int = 1                      # the Retry-After header of a 503
    max_stored_responses: int = 10_000          # Responses API store; the least recently used are forgotten
    conversation_ttl: float | None = None       # seconds an idle named conversation is remembered
    shutdown_timeout_s: float = 5.0             # in-flight requests get this long, then they are cancelled
    # serving as one of several replicas (docs/REPLICAS.md)
    replica_name: str | None = None             # sent back as the x-pensieve-replica header
    kv_events_endpoint: str | None = None       # ZMQ endpoint to publish KV cache events on, e.g. tcp://*:5557
    replica_peers: tuple[tuple[str, str], ...] = ()   # (name, base URL) of the other replicas: stateful turns go there

    def __post_init__(self) -> None:
        if self.max_waiting < 0:
            raise ValueError(f"max_waiting must be >= 0, got {self.max_waiting}")
        if self.max_stored_responses < 1:
            raise ValueError(f"max_stored_responses must be >= 1, got {self.max_stored_responses}")
        if any(not key for key in self.api_keys):
            raise ValueError("API keys must be non-empty strings")
