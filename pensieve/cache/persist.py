"""Hot conversations survive a restart: the cached blocks of both tiers saved to disk and loaded back.

Content keys are deterministic (blake2b over token ids), so a block saved by one process is found
by the next for the same tokens. KV also depends on the weights, the dtype and the block layout:
the manifest records a fingerprint of all three and a mismatch refuses the load.

Nothing loaded may serve wrong KV:
  * every block has a checksum (CRC-32 over its key and bytes: a torn write, bit rot or a block of
    another save fails it); a block that fails is dropped at load, counted and logged, and is
    recomputed when a request needs it;
  * a save is atomic as a whole: it is written to a new directory, synced, then made current by
    replacing the one-line file CURRENT (the commit point); the previous save stays until then, and
    a save that fails (a full disk) is removed and leaves the previous one current;
  * a manifest that is missing, cut short, edited, of another format, model or layout refuses the
    whole save (CacheError): the engine logs one line and starts empty, or refuses to start when the
    operator asked for strictness (`--kv-cache-strict`).

Layout of `--kv-cache-path DIR`:
  DIR/CURRENT                       the name of the current save
  DIR/save-<id>/index.json          the manifest (with a checksum of itself)
  DIR/save-<id>/kv.<rank>.bin       the blocks of tensor-parallel rank <rank>: one record
                                    [layers, 2, block_size, kv_heads of the rank, head_dim] per key,
                                    in manifest order

Two levels, for tensor parallelism (each rank holds its own KV heads): the shard functions
(`write_shard`, `verify_shard`, `read_shard`) touch one process's blocks; every rank runs them on its
own shard, and the bad-block sets of all ranks are unioned (`adopt`'s `bad`) before the blocks are
adopted. The manifest level (`save_cache`, `load_cache`, `open_save`, `adopt`) records the layout,
`tp_size` included (a load under another tp_size is refused), and adopts blocks into the cache
manager. Files are read and written a block at a time, so memory stays flat.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from pensieve.cache.block_keys import BlockKey
from pensieve.cache.manager import KVCacheManager
from pensieve.model.gguf import fingerprint_files

FORMAT = "pensieve-kv-v2"
CURRENT = "CURRENT"
MANIFEST = "index.json"
_SAVE_NAME = re.compile(r"save-[0-9a-f]{16}")


class CacheError(Exception):
    """A saved cache that cannot be used (damaged, foreign) or a path that cannot hold one."""


@dataclass(frozen=True)
class LoadReport:
    loaded: int       # blocks adopted into the cache
    bad: int          # blocks that failed their checksum: dropped, recomputed when next needed
    skipped: int      # good blocks not adopted: no free block left, or the key is cached already


def model_fingerprint(model_dir: str | Path, dtype: torch.dtype, block_size: int) -> str:
    """Hash of what KV depends on: the config, the weights (sizes and edges of every file), dtype, layout."""
    root = Path(model_dir)
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{dtype}|{block_size}".encode())
    config = root / "config.json"
    if config.exists():
        h.update(config.read_bytes())
    for f in fingerprint_files(root):
        size = f.stat().st_size
        h.update(f"{f.name}|{size}".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(1 << 20))
            fh.seek(max(0, size - (1 << 20)))
            h.update(fh.read(1 << 20))
    return h.hexdigest()


def shard_name(rank: int) -> str:
    return f"kv.{rank}.bin"


def block_checksum(key: BlockKey, data: bytes) -> int:
    return zlib.crc32(data, zlib.crc32(key))


# ------------------------------------------------------------------ shard level (one process's blocks)
def _write(f: Any, data: bytes) -> None:
    """Every byte of the cache goes to disk through here (fault-injection tests replace it)."""
    f.write(data)


def write_shard(path: Path, blocks: Iterable[tuple[BlockKey, torch.Tensor]]) -> list[int]:
    """Writes each block's bytes to `path`, in order, and syncs the file; returns their checksums."""
    checksums = []
    with open(path, "wb") as f:
        for key, block in blocks:
            data = _to_bytes(block)
            _write(f, data)
            checksums.append(block_checksum(key, data))
        f.flush()
        os.fsync(f.fileno())
    return checksums


def verify_shard(path: Path, keys: list[BlockKey], checksums: list[int], record_bytes: int) -> set[int]:
    """Indices of the blocks of `path` whose bytes fail their checksum. A file missing or of the wrong
    size (cut short, or another save's) is no shard of this save: CacheError."""
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise CacheError(f"{path.name} is missing ({exc.strerror})") from None
    if size != len(keys) * record_bytes:
        raise CacheError(f"{path.name} has {size} bytes, the manifest says {len(keys)} blocks of {record_bytes}")
    if not keys:
        return set()
    raw = np.memmap(path, dtype=np.uint8, mode="r")
    return {i for i, key in enumerate(keys)
            if block_checksum(key, raw[i * record_bytes:(i + 1) * record_bytes].tobytes()) != checksums[i]}


def read_shard(path: Path, keys: list[BlockKey], checksums: list[int], record_bytes: int, tier: torch.Tensor,
               placements: list[tuple[int, int]]) -> None:
    """Copies block i of the shard into block b of this process's `tier` for each (i, b), checking each
    block again as it is read; CacheError if one changed since `verify_shard`."""
    if not placements:
        return
    raw = np.memmap(path, dtype=np.uint8, mode="r")
    for i, b in placements:
        data = raw[i * record_bytes:(i + 1) * record_bytes].tobytes()
        if block_checksum(keys[i], data) != checksums[i]:
            raise CacheError(f"{path.name} changed while it was loaded (block {i})")
        dest = tier[:, b]
        dest.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8).view(dest.dtype).view(dest.shape))


# ------------------------------------------------------------------ manifest level
def check_path(path: str | Path) -> None:
    """At start: the directory exists (created if not) and takes a file; CacheError otherwise, so it is
    found now rather than at shutdown, with the cache lost."""
    root = Path(path)
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / f".probe-{secrets.token_hex(4)}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise CacheError(f"--kv-cache-path {root} is not writable: {exc.strerror or exc}") from None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _manifest_checksum(manifest: dict[str, Any]) -> str:
    body = json.dumps({k: v for k, v in manifest.items() if k != "checksum"}, sort_keys=True).encode()
    return hashlib.blake2b(body, digest_size=16).hexdigest()


def write_manifest(directory: Path, manifest: dict[str, Any]) -> None:
    manifest = {**manifest, "checksum": _manifest_checksum(manifest)}
    with open(directory / MANIFEST, "w") as f:
        json.dump(manifest, f)
        f.flush()
        os.fsync(f.fileno())


def begin_save(root: Path) -> Path:
    """A new, empty directory for a save, beside the current one."""
    root.mkdir(parents=True, exist_ok=True)
    work = root / f".save-{secrets.token_hex(8)}.tmp"
    work.mkdir()
    return work


def commit_save(root: Path, work: Path) -> Path:
    """Makes the complete save in `work` current (atomically), then removes older saves."""
    _fsync_dir(work)
    final = root / work.name.removeprefix(".").removesuffix(".tmp")
    os.rename(work, final)
    _fsync_dir(root)
    pointer = root / f"{CURRENT}.tmp"
    with open(pointer, "w") as f:
        f.write(final.name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(pointer, root / CURRENT)            # the commit point
    _fsync_dir(root)
    for old in root.iterdir():                     # earlier saves and leftovers of killed ones
        if old != final and (old.name.startswith(("save-", ".save-")) or old.name in ("kv.bin", MANIFEST)):
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)
    return final


class ShardIO(Protocol):
    """Every rank's side of a save: the engine's executor runs each call on all ranks, each on its own
    KV heads, and returns what rank 0 needs (cache/persist.py's shard level does the bytes)."""
    tp_size: int

    def write_kv_shards(self, directory: Path, blocks: list[tuple[BlockKey, str, int]]) -> list[list[int]]:
        """Each rank writes its bytes of (key, tier, block) in order; every rank's checksums, by rank."""

    def verify_kv_shards(self, directory: Path, keys: list[BlockKey], checksums: list[list[int]]) -> set[int]:
        """The union over ranks of the blocks that fail their checksum."""

    def read_kv_shards(self, directory: Path, keys: list[BlockKey], checksums: list[list[int]], tier: str,
                       placements: list[tuple[int, int]]) -> None:
        """Each rank copies its bytes of saved block i into its block b of `tier`, for each (i, b)."""

    def kv_block_layout(self) -> tuple[list[int], torch.dtype]:
        """One rank's block shape [layers, 2, block_size, kv_heads, head_dim] and dtype."""


def save_cache(kv: KVCacheManager, shards: ShardIO, path: str | Path, fingerprint: str, now: float) -> int:
    """Writes every cached block (CPU copies preferred, else the GPU's) and the conversations as a new
    save; returns the number of blocks. On any failure the new save is removed, the previous one stays
    current, and CacheError says why."""
    root = Path(path)
    work: Path | None = None
    try:
        work = begin_save(root)
        entries = kv.cached_blocks()
        checksums = shards.write_kv_shards(work, [(key, tier, block) for key, tier, block, _, _ in entries])
        shape, dtype = shards.kv_block_layout()
        write_manifest(work, dict(
            format=FORMAT, fingerprint=fingerprint, tp_size=shards.tp_size, dtype=str(dtype), block_shape=shape,
            keys=[e[0].hex() for e in entries], positions=[e[3] for e in entries],
            idle_seconds=[max(0.0, now - e[4]) for e in entries], checksums=checksums,
            conversations={cid: {"keys": [k.hex() for k in c.keys], "tokens": c.tokens}
                           for cid, c in kv.conversations.items()}))
        commit_save(root, work)
    except (OSError, ValueError, CacheError) as exc:
        if work is not None and work.exists():
            shutil.rmtree(work, ignore_errors=True)
        raise CacheError(f"could not save the KV cache to {root}: {exc}; the previous save is kept") from exc
    return len(entries)


def open_save(path: str | Path) -> tuple[Path, dict[str, Any]] | None:
    """The current save's directory and manifest; None when nothing was saved there yet; CacheError
    when it is damaged or of another format."""
    root = Path(path)
    try:
        name = (root / CURRENT).read_text().strip()
    except FileNotFoundError:
        if (root / MANIFEST).exists() or (root / "kv.bin").exists():
            raise CacheError(f"{root} holds a cache of an older format, without checksums") from None
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise CacheError(f"{root / CURRENT} is unreadable: {exc}") from None
    if not _SAVE_NAME.fullmatch(name):
        raise CacheError(f"{root / CURRENT} is damaged ({name[:40]!r})")
    directory = root / name
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
    except FileNotFoundError:
        raise CacheError(f"{directory / MANIFEST} is missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CacheError(f"{directory / MANIFEST} is damaged: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise CacheError(f"{directory} is not a Pensieve KV cache of format {FORMAT} ({found!r})")
    if manifest.get("checksum") != _manifest_checksum(manifest):
        raise CacheError(f"{directory / MANIFEST} fails its checksum (edited or damaged)")
    return directory, manifest


def check_layout(manifest: dict[str, Any], fingerprint: str, tp_size: int, block_shape: list[int],
                 dtype: torch.dtype) -> None:
    """CacheError unless the save is of this model, dtype, block layout and tensor-parallel size."""
    if manifest["fingerprint"] != fingerprint:
        raise CacheError("it holds KV of another model, dtype or block size")
    if manifest["tp_size"] != tp_size:
        raise CacheError(f"it was saved with tensor parallelism {manifest['tp_size']}, this engine runs {tp_size}")
    if manifest["block_shape"] != block_shape or manifest["dtype"] != str(dtype):
        raise CacheError(f"block shape {manifest['block_shape']} {manifest['dtype']} != {block_shape} {dtype}")
    n = len(manifest["keys"])
    if not (len(manifest["positions"]) == len(manifest["idle_seconds"]) == n
            and len(manifest["checksums"]) == tp_size and all(len(c) == n for c in manifest["checksums"])):
        raise CacheError("the manifest's lists disagree in length")


def adopt(kv: KVCacheManager, manifest: dict[str, Any], keys: list[BlockKey], bad: set[int], tier: str,
          now: float) -> tuple[list[tuple[int, int]], int]:
    """Registers the blocks not in `bad` (the union over every rank's shard) in `tier`, most recently
    used first, as far as there are free blocks (loading never evicts). Returns the placements
    (manifest index, block) whose bytes every rank then copies, and how many good blocks were skipped."""
    placements: list[tuple[int, int]] = []
    skipped = 0
    for i in np.argsort(manifest["idle_seconds"], kind="stable"):   # most recently used first
        i = int(i)
        if i in bad:
            continue
        block = kv.adopt_block(tier, keys[i], manifest["positions"][i], now - manifest["idle_seconds"][i])
        if block is None:
            skipped += 1
            continue
        placements.append((i, block))
    return placements, skipped


def load_cache(kv: KVCacheManager, shards: ShardIO, path: str | Path, fingerprint: str, now: float) -> LoadReport:
    """Brings the current save back (into the CPU tier, or the GPU's when there is none). CacheError
    when it cannot be used; `kv` may then hold adopted blocks whose bytes were not copied, so the
    caller starts from an empty manager."""
    opened = open_save(path)
    if opened is None:
        return LoadReport(0, 0, 0)
    directory, manifest = opened
    try:
        shape, dtype = shards.kv_block_layout()
        check_layout(manifest, fingerprint, shards.tp_size, shape, dtype)
        keys = [bytes.fromhex(k) for k in manifest["keys"]]
        checksums = manifest["checksums"]
        bad = shards.verify_kv_shards(directory, keys, checksums)
        tier = "cpu" if kv.num_cpu_blocks > 0 else "gpu"
        placements, skipped = adopt(kv, manifest, keys, bad, tier, now)
        shards.read_kv_shards(directory, keys, checksums, tier, placements)
        for cid, conv in manifest["conversations"].items():
            kv.record_conversation(cid, [bytes.fromhex(k) for k in conv["keys"]], conv["tokens"])
    except CacheError as exc:
        raise CacheError(f"{directory}: {exc}") from None
    except (OSError, KeyError, TypeError, ValueError) as exc:
        raise CacheError(f"{directory} is damaged: {type(exc).__name__}: {exc}") from None
    return LoadReport(len(placements), len(bad), skipped)


def block_record_bytes(tier: torch.Tensor) -> int:
    """Bytes of one saved block of a tier [layers, blocks, 2, block_size, kv_heads, head_dim]."""
    return tier[:, 0].numel() * tier.element_size()


def _to_bytes(t: torch.Tensor) -> bytes:
    return t.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes()
