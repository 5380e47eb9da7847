"""The multi-turn workload: Poisson conversation arrivals, exponential think times, and the turn prompts.

All random draws happen here, up front, from one seed, so every system in a run sees the same conversations
at the same arrival times with the same think times (only the response times differ).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from pensieve.bench.datasets import Conversation


@dataclass(frozen=True)
class WorkloadConfig:
    rate: float                        # new conversations per second (Poisson)
    think_time_mean: float = 60.0      # seconds between a reply's arrival and the next turn (exponential)
    duration: float | None = 60.0      # arrivals stop after this many seconds (None: only max_conversations bounds)
    max_conversations: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.rate <= 0:
            raise ValueError(f"rate must be > 0, got {self.rate}")
        if self.think_time_mean < 0:
            raise ValueError(f"think_time_mean must be >= 0, got {self.think_time_mean}")
        if self.duration is None and self.max_conversations is None:
            raise ValueError("bound the workload with a duration or max_conversations")


@dataclass(frozen=True)
class ScheduledConversation:
    conversation: Conversation
    start_time: float                  # seconds after the run starts when turn 0 is sent
    think_times: tuple[float, ...]     # think_times[i]: pause after reply i before turn i + 1


def poisson_arrivals(rate: float, rng: np.random.Generator, duration: float | None = None,
                     max_count: int | None = None) -> list[float]:
    """Arrival times of a Poisson process of `rate` per second, from t=0, until `duration` or `max_count`."""
    if rate <= 0:
        raise ValueError(f"rate must be > 0, got {rate}")
    if duration is None and max_count is None:
        raise ValueError("bound the arrivals with a duration or max_count")
    times: list[float] = []
    t = 0.0
    while max_count is None or len(times) < max_count:
        t += float(rng.exponential(1.0 / rate))
        if duration is not None and t > duration:
            break
        times.append(t)
    return times


def think_times(rng: np.random.Generator, mean: float, n: int) -> list[float]:
    """n exponential think times of the given mean (all zero when mean is 0)."""
    if mean <= 0:
        return [0.0] * n
    return [float(x) for x in rng.exponential(mean, size=n)]


def num_arrivals(cfg: WorkloadConfig) -> int:
    """How many conversations a workload starts (same draw as build_schedule)."""
    rng = np.random.default_rng([cfg.seed, 1])
    return len(poisson_arrivals(cfg.rate, rng, cfg.duration, cfg.max_conversations))


def build_schedule(conversations: Sequence[Conversation], cfg: WorkloadConfig) -> list[ScheduledConversation]:
    """Assign the conversations, in order, to the Poisson arrivals of `cfg`. Raises if there are fewer
    conversations than arrivals: reusing one would let content-matching caches hit across conversations."""
    rng_arrival = np.random.default_rng([cfg.seed, 1])
    rng_think = np.random.default_rng([cfg.seed, 2])
    starts = poisson_arrivals(cfg.rate, rng_arrival, cfg.duration, cfg.max_conversations)
    if len(conversations) < len(starts):
        raise ValueError(f"the workload needs {len(starts)} conversations, only {len(conversations)} given")
    out: list[ScheduledConversation] = []
    for conv, start in zip(conversations, starts):
        out.append(ScheduledConversation(conv, start, tuple(think_times(rng_think, cfg.think_time_mean,
                                                                        max(0, len(conv.turns) - 1)))))
    return out


def append_turn_prompt(history: list[int], user_ids: Sequence[int]) -> list[int]:
    """Turn n's prompt: every earlier prompt and reply token id (exactly as generated) + the new user ids."""
    return list(history) + list(user_ids)
