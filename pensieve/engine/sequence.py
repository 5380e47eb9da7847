"""One request's state as the scheduler sees it: tokens, blocks, and which positions still need KV."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

from pensieve.cache.block_keys import BlockKey, extend_block_keys, salt_root
from pensieve.engine.outputs import CacheUsage
from pensieve.sampling_params import SamplingParams


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    request_id: str
    token_ids: list[int]                  # prompt + generated so far
    num_prompt_tokens: int
    params: SamplingParams
    arrival_time: float
    conversation_id: str | None = None
    cache_salt: str | None = None         # tenant isolation: the block keys' chain starts from its digest
    status: SeqStatus = SeqStatus.WAITING
    block_table: list[int] = field(default_factory=list)
    block_keys: list[BlockKey] = field(default_factory=list)
    # [start, end) position ranges whose KV is not in the cache yet, ascending.
    # Prefill, chunked prefill, a recomputed prefix and decode are all just this list.
    pending: list[tuple[int, int]] = field(default_factory=list)
    cache: CacheUsage = field(default_factory=CacheUsage)
    num_preemptions: int = 0
    # the last token is a placeholder: an overlapped step is computing its KV while the step that
    # samples it has not been read back yet (see LLMEngine.step)
    unresolved: bool = False
    key_root: BlockKey = field(init=False)

    def __post_init__(self) -> None:
        self.key_root = salt_root(self.cache_salt)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_pending(self) -> int:
        return sum(hi - lo for lo, hi in self.pending)

    def take_pending(self, budget: int) -> list[tuple[int, int]]:
        """Pop up to `budget` pending positions, lowest first (a token's KV needs all earlier ones)."""
        taken: list[tuple[int, int]] = []
        while self.pending and budget > 0:
            lo, hi = self.pending[0]
            n = min(hi - lo, budget)
            taken.append((lo, lo + n))
            budget -= n
            if lo + n == hi:
                self.pending.pop(0)
            else:
                self.pending[0] = (lo + n, hi)
        return taken

    def append_token(self, token_id: int, block_size: int) -> None:
        """A sampled token: it becomes the next position to compute, unless an overlapped step
        already holds it as a placeholder (then it only replaces the placeholder)."""
        if self.unresolved:
            self.token_ids[-1] = token_id
            self.unresolved = False
        else:
            self.token_ids.append(token_id)
            self.pending.append((self.num_tokens - 1, self.num_tokens))
        extend_block_keys(self.block_keys, self.token_ids, block_size, self.key_root)

    def append_placeholder(self) -> None:
        """The token being sampled on the GPU right now, scheduled before its value is known.
        Block keys are content hashes: they wait for the real token (append_token)."""
        if self.unresolved or self.pending:
            raise RuntimeError(f"{self.request_id}: one token in flight at a time")
        self.token_ids.append(-1)
        self.pending.append((self.num_tokens - 1, self.num_tokens))
        self.unresolved = True
