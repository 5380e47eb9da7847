"""Which named conversation owns which cached blocks: for deletion, expiry and recompute accounting.

Reuse itself never needs this (blocks are found by content key); ownership decides what an
explicit delete or an expired TTL may free: a block shared with a conversation still alive
(a common system prompt) stays.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

from pensieve.cache.block_keys import BlockKey


@dataclass
class Conversation:
    keys: list[BlockKey]      # its computed full blocks, in order
    last_active: float
    tokens: list[int]         # the whole conversation so far (last prompt + reply): a new turn appends to it


class ConversationOwners:
    def __init__(self) -> None:
        self._convs: dict[str, Conversation] = {}
        self._owners: Counter[BlockKey] = Counter()

    def record(self, conversation_id: str, keys: list[BlockKey], now: float, tokens: list[int] | None = None) -> None:
        old = self._convs.get(conversation_id)
        self._owners.update(keys)
        if old is not None:
            self._disown(old.keys)
        self._convs[conversation_id] = Conversation(list(keys), now, list(tokens or []))

    def _disown(self, keys: list[BlockKey]) -> list[BlockKey]:
        """One owner fewer for each of `keys`; returns those left with none (and forgets them).
        Only these keys are touched: a pass over every count would cost each finished turn time
        in proportion to all the conversations ever cached."""
        owners, orphans = self._owners, []
        for k in keys:
            n = owners[k] - 1
            if n > 0:
                owners[k] = n
            else:
                owners.pop(k, None)
                orphans.append(k)
        return orphans

    def touch(self, conversation_id: str, now: float) -> None:
        conv = self._convs.get(conversation_id)
        if conv is not None:
            conv.last_active = now

    def remove(self, conversation_id: str) -> list[BlockKey] | None:
        """Forget a conversation; returns the keys nobody owns any more (None if it was unknown)."""
        conv = self._convs.pop(conversation_id, None)
        if conv is None:
            return None
        return self._disown(conv.keys)

    def idle_since(self, cutoff: float) -> list[str]:
        return [cid for cid, c in self._convs.items() if c.last_active < cutoff]

    def get(self, conversation_id: str) -> Conversation | None:
        return self._convs.get(conversation_id)

    def __getitem__(self, conversation_id: str) -> Conversation:
        return self._convs[conversation_id]

    def __contains__(self, conversation_id: object) -> bool:
        return conversation_id in self._convs

    def __iter__(self) -> Iterator[str]:
        return iter(self._convs)

    def __len__(self) -> int:
        return len(self._convs)

    def items(self):
        return self._convs.items()
