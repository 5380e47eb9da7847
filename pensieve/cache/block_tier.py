"""One tier's blocks (the GPU pool or the CPU pool): free list, content index, users and last use.

Plain Python and numpy over block ids; the KV tensors live in `kv_pool`. A block is free (no content,
no users), idle (content, no users: it may be evicted), or in use (users > 0: running sequences and
copies in flight on the GPU; copies in flight on the CPU), with or without content. The same class
serves both tiers; `KVCacheManager` links them and decides what moves.
"""
from __future__ import annotations

import numpy as np

from pensieve.cache.block_keys import BlockKey


class CacheIntegrityError(RuntimeError):
    """The block bookkeeping contradicts itself: a bug, never user input."""


class BlockTier:
    def __init__(self, name: str, num_blocks: int) -> None:
        self.name = name
        self.num_blocks = num_blocks
        self.free: list[int] = list(range(num_blocks - 1, -1, -1))   # a stack: pop() takes the lowest id first
        self.keys: list[BlockKey | None] = [None] * num_blocks
        self.index: dict[BlockKey, int] = {}
        self.users = np.zeros(num_blocks, np.int32)
        self.has_content = np.zeros(num_blocks, bool)
        self.last_use = np.zeros(num_blocks)
        self.position = np.zeros(num_blocks)        # the block's index within its sequence (retention value)

    # ------------------------------------------------------------ queries
    @property
    def num_free(self) -> int:
        return len(self.free)

    def idle(self) -> np.ndarray:
        """Ids of the blocks with content and no users: what eviction may take."""
        return np.flatnonzero(self.has_content & (self.users == 0))

    @property
    def num_idle(self) -> int:
        return int(np.count_nonzero(self.has_content & (self.users == 0)))

    def lookup(self, key: BlockKey) -> int | None:
        return self.index.get(key)

    # ------------------------------------------------------------ changes
    def take_free(self) -> int:
        return self.free.pop()

    def register(self, block: int, key: BlockKey, position: float, now: float) -> None:
        """The block now holds the KV of `key` (the tokens up to the end of block `position`)."""
        self.keys[block] = key
        self.index[key] = block
        self.has_content[block] = True
        self.position[block] = position
        self.last_use[block] = now

    def unregister(self, block: int) -> None:
        """The block's content is gone (it stays allocated to whoever uses it)."""
        key = self.keys[block]
        if key is not None and self.index.get(key) == block:
            del self.index[key]
        self.keys[block] = None
        self.has_content[block] = False

    def release_to_free(self, block: int) -> None:
        self.unregister(block)
        self.free.append(block)

    # ------------------------------------------------------------ invariants
    def check(self) -> None:
        """Every block in exactly one state, and the content index points back; raises CacheIntegrityError."""
        free = np.zeros(self.num_blocks, bool)
        free[self.free] = True
        if free.sum() != len(self.free):
            raise CacheIntegrityError(f"{self.name}: a block is on the free list twice")
        if (self.users < 0).any():
            raise CacheIntegrityError(f"{self.name}: negative user count on blocks "
                                      f"{np.flatnonzero(self.users < 0)[:8].tolist()}")
        bad = np.flatnonzero(free & ((self.users > 0) | self.has_content))
        if len(bad):
            raise CacheIntegrityError(f"{self.name}: free blocks {bad[:8].tolist()} hold content or users")
        lost = np.flatnonzero(~free & ~self.has_content & (self.users == 0))
        if len(lost):
            raise CacheIntegrityError(f"{self.name}: blocks {lost[:8].tolist()} are neither free, cached nor used")
        for key, block in self.index.items():
            if self.keys[block] != key or not self.has_content[block]:
                raise CacheIntegrityError(f"{self.name}: index entry for block {block} does not point back")
        keyed = np.array([k is not None for k in self.keys], bool)
        if (keyed != self.has_content).any():
            raise CacheIntegrityError(f"{self.name}: content flags and keys disagree")
