"""What a backend is asked per turn and what it answers: plain records shared by backends, runner and metrics."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class TurnRequest:
    request_id: str
    conversation_id: str
    turn_index: int
    prompt_token_ids: tuple[int, ...]          # the whole history + the new user turn (completions API)
    max_tokens: int                            # the data set's reply length (forced: ignore_eos, temperature 0)
    messages: tuple[dict[str, str], ...] = ()  # the same turn as chat messages (chat API)


@dataclass
class TurnResult:
    request_id: str
    conversation_id: str
    turn_index: int
    send_time: float                           # seconds since the run started
    first_token_time: float | None = None
    finish_time: float | None = None
    prompt_tokens: int = 0
    output_tokens: int = 0
    output_token_ids: list[int] = field(default_factory=list)
    output_text: str = ""
    gpu_hit_tokens: int = 0
    cpu_hit_tokens: int = 0
    recomputed_tokens: int = 0
    cached_tokens: int = 0                     # gpu + cpu hits (or the server's usage figure)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.finish_time is not None and self.output_tokens > 0

    @property
    def ttft(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.send_time

    @property
    def e2e(self) -> float | None:
        return None if self.finish_time is None else self.finish_time - self.send_time

    @property
    def normalized_latency(self) -> float | None:
        """End-to-end seconds per output token: the paper's y-axis."""
        if self.finish_time is None or self.output_tokens <= 0:
            return None
        return (self.finish_time - self.send_time) / self.output_tokens

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first."""
        if self.first_token_time is None or self.finish_time is None or self.output_tokens < 2:
            return None
        return (self.finish_time - self.first_token_time) / (self.output_tokens - 1)

    def to_json(self, with_ids: bool = False) -> dict[str, Any]:
        d = asdict(self)
        if not with_ids:
            d.pop("output_token_ids")
            d.pop("output_text")
        return d
