"""What the engine hands back per request and step."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CacheUsage:
    """Where the prompt's KV came from, for usage reporting and metrics."""

    gpu_hit_tokens: int = 0        # served from GPU blocks
    cpu_hit_tokens: int = 0        # swapped in from the CPU tier
    recomputed_tokens: int = 0     # cached once but dropped, computed again

    @property
    def cached_tokens(self) -> int:
        return self.gpu_hit_tokens + self.cpu_hit_tokens


@dataclass
class CompletionOutput:
    index: int
    text: str                                  # cumulative text so far
    token_ids: list[int]                       # cumulative generated ids
    finish_reason: str | None = None           # "stop" | "length" | "abort" | None while running
    stop_reason: int | str | None = None       # the stop string or token id that ended it
    # one entry per generated token: (sampled logprob, {token_id: logprob} of the top-k)
    logprobs: list[tuple[float, dict[int, float]]] | None = None


@dataclass
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    cache: CacheUsage = field(default_factory=CacheUsage)
    metrics: RequestMetrics | None = None
    conversation_id: str | None = None

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)
