"""Deterministic content keys for full KV blocks: a hash chain over token ids.

Block i's key hashes block i-1's key with block i's tokens, so a key names
the whole token prefix up to the end of its block: KV is reused only for
identical tokens at identical positions. blake2b (not Python's salted hash)
keeps keys equal across processes and restarts.
"""
from __future__ import annotations

import hashlib
from array import array

BlockKey = bytes


def extend_block_keys(keys: list[BlockKey], token_ids: list[int], block_size: int) -> None:
    """Append the keys of every full block of `token_ids` not yet in `keys`."""
    num_full = len(token_ids) // block_size
    parent = keys[-1] if keys else b""
    for i in range(len(keys), num_full):
        chunk = array("q", token_ids[i * block_size:(i + 1) * block_size]).tobytes()
        parent = hashlib.blake2b(parent + chunk, digest_size=16).digest()
        keys.append(parent)


def block_keys(token_ids: list[int], block_size: int) -> list[BlockKey]:
    keys: list[BlockKey] = []
    extend_block_keys(keys, token_ids, block_size)
    return keys
