"""KV cache events for routers that score replicas by the blocks they hold (vllm-router's kv_aware policy).

The schema is vLLM's: BlockStored (block hashes, parent hash, token ids, block size, medium), BlockRemoved
(block hashes, medium) and AllBlocksCleared, published on a ZMQ PUB socket as multipart frames
[topic, sequence number (8 bytes, big-endian), msgpack payload]. The payload is an event batch
[timestamp, [event, ...], data_parallel_rank]; each event is a map tagged by its "type" field, the encoding
vllm-router 0.1.17 decodes (it rejects the positional-array form).

The cache is watched, not instrumented: every `interval_s` the publisher reads the content keys each tier
holds and announces the difference from what it announced before. A block's tokens come from the requests
the server finished (their prompt and reply ids give the blocks' keys by the same hash chain as the
engine's), so a block is announced once it is both cached and explained. Block hashes are the first 8 bytes
of Pensieve's content keys; a block's parent is the block before it in its sequence.

Dropped leading tokens are represented as they are: the dropped blocks are removed, the later blocks of the
conversation stay stored. A router that matches prefixes from the first block (vllm-router does) then scores
that conversation as a miss on this replica, although the replica would recompute only the dropped part.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from pensieve.cache.block_keys import BlockKey, block_keys, salt_root

log = logging.getLogger(__name__)

GPU, CPU = "GPU", "CPU"   # vLLM's medium names: device memory and host memory (its CPU offload tier)

Event = dict[str, Any]


def block_hash(key: BlockKey) -> int:
    """A content key as vLLM's 64-bit block hash."""
    return int.from_bytes(key[:8], "big")


@dataclass(frozen=True)
class KnownBlock:
    index: int                      # position of the block in its token sequence
    parent: BlockKey | None
    token_ids: tuple[int, ...]


class BlockLedger:
    """What each tier was announced to hold, and the tokens of the blocks the server has seen.

    `diff` turns two snapshots of the engine's key sets into events; it is pure bookkeeping, so it is
    tested without a socket or an engine.
    """

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self.known: dict[BlockKey, KnownBlock] = {}
        self.announced: dict[str, set[BlockKey]] = {GPU: set(), CPU: set()}
        self._fresh: set[BlockKey] = set()   # learned since the last diff: kept one diff even if not cached yet

    def learn(self, token_ids: Sequence[int], cache_salt: str | None = None) -> None:
        """Record the blocks of a finished request's tokens (prompt and reply), keyed as the engine keyed
        them (under the request's cache salt)."""
        bs = self.block_size
        keys = block_keys(list(token_ids), bs, salt_root(cache_salt))
        parent: BlockKey | None = None
        for i, key in enumerate(keys):
            if key not in self.known:
                self.known[key] = KnownBlock(i, parent, tuple(token_ids[i * bs:(i + 1) * bs]))
                self._fresh.add(key)
            parent = key

    def diff(self, gpu_keys: Iterable[BlockKey], cpu_keys: Iterable[BlockKey]) -> list[Event]:
        """Events that bring a subscriber from the last announced state to this snapshot."""
        present = {GPU: set(gpu_keys), CPU: set(cpu_keys)}
        events: list[Event] = []
        for medium in (GPU, CPU):
            gone = self.announced[medium] - present[medium]
            if gone:
                events.append(self._removed(gone, medium))
                self.announced[medium] -= gone
            new = [k for k in present[medium] - self.announced[medium] if k in self.known]
            new.sort(key=lambda k: self.known[k].index)   # parents before children
            events.extend(self._stored(k, medium) for k in new)
            self.announced[medium].update(new)
        cached = present[GPU] | present[CPU]
        for key in [k for k in self.known if k not in cached and k not in self._fresh]:
            del self.known[key]
        self._fresh.clear()
        return events

    def snapshot(self) -> list[Event]:
        """Everything announced, after a clear: lets a subscriber that missed events (or restarted) resync."""
        events: list[Event] = [{"type": "AllBlocksCleared"}]
        for medium in (GPU, CPU):
            for key in sorted(self.announced[medium], key=lambda k: self.known[k].index):
                events.append(self._stored(key, medium))
        return events

    def _stored(self, key: BlockKey, medium: str) -> Event:
        block = self.known[key]
        return {"type": "BlockStored", "block_hashes": [block_hash(key)],
                "parent_block_hash": None if block.parent is None else block_hash(block.parent),
                "token_ids": list(block.token_ids), "block_size": self.block_size, "lora_id": None,
                "medium": medium, "lora_name": None}

    @staticmethod
    def _removed(keys: Iterable[BlockKey], medium: str) -> Event:
        return {"type": "BlockRemoved", "block_hashes": sorted(block_hash(k) for k in keys), "medium": medium}


class KVEventPublisher:
    """Binds a ZMQ PUB socket and publishes the ledger's diffs of the engine's cache, on the server's loop."""

    def __init__(self, endpoint: str, block_size: int, cached_keys: Callable[[], tuple[list, list]],
                 interval_s: float = 0.5, resync_s: float = 30.0, topic: str = "") -> None:
        import zmq  # optional dependency: only replicas that publish events need it

        self.ledger = BlockLedger(block_size)
        self._cached_keys = cached_keys
        self._interval_s = interval_s
        self._resync_s = resync_s
        self._topic = topic.encode()
        self._seq = 0
        self._context = zmq.Context()
        self._socket = self._context.socket(zmq.PUB)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.bind(endpoint)
        self._task: asyncio.Task | None = None
        self._wake: asyncio.Event | None = None

    def learn(self, token_ids: Sequence[int], cache_salt: str | None = None) -> None:
        """A finished request's tokens; its blocks are announced at once (the client's next turn follows soon)."""
        self.ledger.learn(token_ids, cache_salt)
        if self._wake is not None:
            self._wake.set()

    def publish(self, events: list[Event]) -> None:
        import msgpack

        if not events:
            return
        payload = msgpack.packb([time.time(), events, None])
        self._socket.send_multipart([self._topic, self._seq.to_bytes(8, "big"), payload])
        self._seq += 1

    async def poll_once(self) -> None:
        gpu, cpu = await asyncio.to_thread(self._cached_keys)
        self.publish(self.ledger.diff(gpu, cpu))

    async def run(self) -> None:
        self.publish([{"type": "AllBlocksCleared"}])   # a fresh replica holds nothing a router remembers
        last_resync = time.monotonic()
        failing = False
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), self._interval_s)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()
            try:
                await self.poll_once()
                if time.monotonic() - last_resync >= self._resync_s:
                    last_resync = time.monotonic()
                    self.publish(self.ledger.snapshot())
                failing = False
            except Exception:  # e.g. the engine stopped (/health says so): log once, keep trying
                if not failing:
                    log.exception("KV event poll failed")
                failing = True

    def start(self) -> None:
        self._wake = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self.run(), name="pensieve-kv-events")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._socket.close(0)
        self._context.term()
