"""What the engine hands back per request and step.

A streamed request (`stream=True`) gets one output per step that carries only what is new since its
previous output (text, token ids, logprobs): a long stream costs O(its length), not O(length^2). A
request that is not streamed gets an output at its first token (carrying that token: its time is the
TTFT) and a final output that carries the whole completion.
"""
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
    text: str                                  # new text (streamed) or the whole text (final, not streamed)
    token_ids: list[int]                       # new generated ids, or all of them, as `text`
    finish_reason: str | None = None           # "stop" | "length" | "abort" | None while running
    stop_reason: int | str | None = None       # the stop string or token id that ended it
    # one entry per id of `token_ids`: (sampled logprob, {token_id: logprob} of the top-k)
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
