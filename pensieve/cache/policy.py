"""Which cached blocks to give up first: the paper's retention value, or LRU.

A policy scores candidate blocks; the lowest scores are evicted first. Both
break ties toward the *leading* blocks of a conversation, whose KV is the
cheapest to recompute (a token's KV depends only on the tokens before it).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import numpy as np


@dataclass(frozen=True)
class RecomputeCost:
    """Cost(l) of recomputing one block whose first token has l tokens before it.

    Cost(l) = c + a * l: `c` is the context-independent part (linear layers,
    norms, activations: ~2 * params FLOPs per token) and `a * l` the attention
    over the l earlier tokens (~4 * layers * q_heads * head_dim FLOPs per token
    per context token), weighted by how much slower attention runs than GEMMs.
    Only the ratio c / a matters for ranking.
    """

    linear_flops_per_token: float = 2.0e9
    attention_flops_per_context_token: float = 4.0 * 32 * 4096
    attention_slowdown: float = 4.0   # attention FLOPs are dearer than GEMM FLOPs

    @classmethod
    def for_model(cls, num_params: float, num_layers: int, num_heads: int, head_dim: int) -> RecomputeCost:
        return cls(2.0 * num_params, 4.0 * num_layers * num_heads * head_dim)

    def __call__(self, context_tokens: np.ndarray) -> np.ndarray:
        return self.linear_flops_per_token + self.attention_slowdown * self.attention_flops_per_context_token * context_tokens


@dataclass(frozen=True)
class ProfiledCost:
    """Cost(l) measured, as the paper does: the time to recompute one block after l context tokens,
    timed at a few context lengths and interpolated linearly (extrapolated past the last one)."""

    context_tokens: tuple[float, ...]   # ascending
    seconds: tuple[float, ...]

    @classmethod
    def measure(cls, time_block: Callable[[int], float], max_context: int) -> ProfiledCost:
        lengths = [0] + [1 << k for k in range(8, 31) if (1 << k) <= max_context]
        times = [time_block(n) for n in lengths]
        # timing noise must not make a longer context look cheaper: keep the curve non-decreasing
        return cls(tuple(float(n) for n in lengths), tuple(np.maximum.accumulate(times).tolist()))

    def __call__(self, context_tokens: np.ndarray) -> np.ndarray:
        xs, ys = np.asarray(self.context_tokens), np.asarray(self.seconds)
        out = np.interp(context_tokens, xs, ys)
        if len(xs) > 1:
            slope = (ys[-1] - ys[-2]) / max(xs[-1] - xs[-2], 1.0)
            beyond = context_tokens > xs[-1]
            out = np.where(beyond, ys[-1] + slope * (context_tokens - xs[-1]), out)
        return out


class EvictionPolicy(Protocol):
    name: str

    def scores(self, last_access: np.ndarray, block_index: np.ndarray, now: float) -> np.ndarray:
        """Lower score = evict sooner. block_index: position of the block in its sequence."""
        ...


@dataclass(frozen=True)
class RetentionValuePolicy:
    """The paper's V = Cost(l) / T: cheap-to-rebuild and long-idle blocks go first."""

    block_size: int
    cost: Callable[[np.ndarray], np.ndarray] = RecomputeCost()   # RecomputeCost or ProfiledCost
    name: str = "retention"

    def scores(self, last_access: np.ndarray, block_index: np.ndarray, now: float) -> np.ndarray:
        idle = np.maximum(now - last_access, 1e-3)
        return self.cost(block_index * self.block_size) / idle


@dataclass(frozen=True)
class LRUPolicy:
    """Least recently used first; within one conversation, leading blocks first."""

    name: str = "lru"

    def scores(self, last_access: np.ndarray, block_index: np.ndarray, now: float) -> np.ndarray:
        return last_access + 1e-9 * block_index


def lowest(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k lowest scores, in ascending score order; equal scores in ascending index order
    (as argmin takes them)."""
    if k >= len(scores):
        return np.argsort(scores, kind="stable")
    part = np.sort(np.argpartition(scores, k)[:k])
    return part[np.argsort(scores[part], kind="stable")]
