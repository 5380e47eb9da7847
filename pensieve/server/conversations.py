"""Server-side conversation state: stored responses (Responses API) and named conversations.

Everything here is touched only from the server's event loop, so a check-then-set with no `await`
between is atomic and no thread locks are needed. Every entry carries its owner (a digest of the API
key that made it, None without auth): another owner sees it as absent (404), never as forbidden.
"""
from __future__ import annotations

import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pensieve.server.errors import APIError

Owner = str | None


def new_id(prefix: str) -> str:
    """An unguessable public id (128 bits of randomness)."""
    return f"{prefix}_{secrets.token_urlsafe(16)}"


@dataclass
class StoredResponse:
    id: str
    owner: Owner
    conversation_id: str               # public id of the chain's conversation (registry key)
    created_at: int
    model: str
    messages: list[dict[str, str]]     # whole history, this reply included
    token_ids: list[int]               # prompt + output ids: the next turn appends to these
    reply_start: int                   # token_ids[reply_start:] are the generated ids
    output_text: str
    finish_reason: str
    usage: dict[str, Any]
    request: dict[str, Any] = field(default_factory=dict)  # echoed fields: instructions, temperature, ...


class ResponseStore:
    """Stored responses by id, bounded: the least recently used are forgotten first."""

    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        self._items: OrderedDict[str, StoredResponse] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def put(self, response: StoredResponse) -> None:
        self._items[response.id] = response
        self._items.move_to_end(response.id)
        while len(self._items) > self._capacity:
            self._items.popitem(last=False)

    def get(self, response_id: str, owner: Owner) -> StoredResponse | None:
        item = self._items.get(response_id)
        if item is None or item.owner != owner:
            return None
        self._items.move_to_end(response_id)
        return item

    def delete(self, response_id: str, owner: Owner) -> bool:
        if self.get(response_id, owner) is None:
            return False
        del self._items[response_id]
        return True


@dataclass
class Conversation:
    engine_id: str          # what the engine knows it by; never chosen by a client
    last_used: float
    busy: bool = False


class ConversationRegistry:
    """Named conversations per owner, each with one request at a time (a second one gets 409)."""

    def __init__(self, ttl: float | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self._ttl = ttl
        self._clock = clock
        self._items: dict[tuple[Owner, str], Conversation] = {}

    def __len__(self) -> int:
        return len(self._items)

    def lookup(self, owner: Owner, name: str) -> Conversation | None:
        return self._items.get((owner, name))

    def acquire(self, owner: Owner, name: str) -> Conversation:
        """Marks the conversation busy for one request (created on first use); pair with release()."""
        conv = self._items.get((owner, name))
        if conv is None:
            conv = Conversation(engine_id=new_id("conv"), last_used=self._clock())
            self._items[(owner, name)] = conv
        if conv.busy:
            raise APIError(409, f"Conversation '{name}' already has a request in progress; "
                                "send one request per conversation at a time", code="conversation_busy")
        conv.busy = True
        return conv

    def release(self, conv: Conversation) -> None:
        conv.busy = False
        conv.last_used = self._clock()

    def remove(self, owner: Owner, name: str) -> Conversation | None:
        conv = self._items.get((owner, name))
        if conv is None:
            return None
        if conv.busy:
            raise APIError(409, f"Conversation '{name}' has a request in progress", code="conversation_busy")
        del self._items[(owner, name)]
        return conv

    def clear(self) -> None:
        """Forgets every conversation without a request in progress (the engine's cache was reset)."""
        self._items = {key: c for key, c in self._items.items() if c.busy}

    def expire(self) -> list[str]:
        """Forgets idle conversations older than the TTL; returns their engine ids to free."""
        if self._ttl is None:
            return []
        deadline = self._clock() - self._ttl
        stale = [key for key, c in self._items.items() if not c.busy and c.last_used < deadline]
        return [self._items.pop(key).engine_id for key in stale]
