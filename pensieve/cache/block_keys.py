"""Deterministic content keys for full KV blocks: a hash chain over token ids.

Block i's key hashes block i-1's key with block i's tokens, so a key names
the whole token prefix up to the end of its block: KV is reused only for
identical tokens at identical positions. blake2b (not Python's salted hash)
keeps keys equal across processes and restarts.

The chain starts from a root: b"" for unsalted requests, else a digest of the request's cache salt
(the server salts with the API key's owner and the request's `cache_salt`). Equal tokens under
different salts never share a key, so one tenant can neither hit nor probe (cached_tokens, time to
first token) nor delete another's blocks.
"""
from __future__ import annotations

import hashlib
from array import array

BlockKey = bytes


def salt_root(cache_salt: str | None) -> BlockKey:
    """The hash chain's root for requests under `cache_salt` (None: unsalted, b"")."""
    if cache_salt is None:
        return b""
    return hashlib.blake2b(cache_salt.encode("utf-8", "surrogatepass"), digest_size=16,
                           person=b"pensieve-salt").digest()


def extend_block_keys(keys: list[BlockKey], token_ids: list[int], block_size: int, root: BlockKey = b"") -> None:
    """Append the keys of every full block of `token_ids` not yet in `keys`; the chain starts at `root`."""
    num_full = len(token_ids) // block_size
    parent = keys[-1] if keys else root
    for i in range(len(keys), num_full):
        chunk = array("q", token_ids[i * block_size:(i + 1) * block_size]).tobytes()
        parent = hashlib.blake2b(parent + chunk, digest_size=16).digest()
        keys.append(parent)


def block_keys(token_ids: list[int], block_size: int, root: BlockKey = b"") -> list[BlockKey]:
    keys: list[BlockKey] = []
    extend_block_keys(keys, token_ids, block_size, root)
    return keys
