"""Hot conversations survive a restart: the cached blocks of both tiers saved to disk and loaded back.

Content keys are deterministic (blake2b over token ids), so a block saved by one process is found
by the next for the same tokens. KV also depends on the weights, the dtype and the block layout:
the file records a fingerprint of all three and a mismatch refuses the load.

Format, in a directory: `index.json` (fingerprint, block shape, keys, block positions, idle ages,
conversations) and `kv.bin` (the blocks' raw bytes, one [layers, 2, block_size, kv_heads, head_dim]
record per key, in index order), written and read a block at a time so memory stays flat.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch

from pensieve.cache.manager import KVCacheManager
from pensieve.model.gguf import fingerprint_files

FORMAT = "pensieve-kv-v1"


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


def save_cache(kv: KVCacheManager, gpu_tier: torch.Tensor, cpu_tier: torch.Tensor, path: str | Path,
               fingerprint: str, now: float) -> int:
    """Write every cached block (CPU copies preferred, else the GPU's). Returns the number saved."""
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    entries = kv.cached_blocks()
    keys, positions, ages = [], [], []
    tmp = out / "kv.bin.tmp"
    with open(tmp, "wb") as f:
        for key, tier, block, pos, last in entries:
            data = (cpu_tier if tier == "cpu" else gpu_tier)[:, block]   # [L, 2, bs, H, D]
            f.write(_to_bytes(data))
            keys.append(key.hex())
            positions.append(pos)
            ages.append(max(0.0, now - last))
    index = dict(format=FORMAT, fingerprint=fingerprint, dtype=str(gpu_tier.dtype),
                 block_shape=[gpu_tier.shape[0], *gpu_tier.shape[2:]], keys=keys, positions=positions,
                 idle_seconds=ages, conversations={cid: {"keys": [k.hex() for k in c.keys], "tokens": c.tokens}
                                                   for cid, c in kv.conversations.items()})
    (out / "index.json.tmp").write_text(json.dumps(index))
    os.replace(tmp, out / "kv.bin")                 # index last: a crash mid-save leaves no valid pair
    os.replace(out / "index.json.tmp", out / "index.json")
    return len(keys)


def load_cache(kv: KVCacheManager, gpu_tier: torch.Tensor, cpu_tier: torch.Tensor, path: str | Path,
               fingerprint: str, now: float) -> int:
    """Bring saved blocks back (into the CPU tier, or the GPU's when there is none), most recently
    used first, as far as there is room. Returns the number loaded; refuses another model's cache."""
    root = Path(path)
    index = json.loads((root / "index.json").read_text())
    if index.get("format") != FORMAT:
        raise ValueError(f"{root} is not a Pensieve KV cache ({index.get('format')!r})")
    if index["fingerprint"] != fingerprint:
        raise ValueError(f"{root} holds KV of another model, dtype or block size: refusing to load it")
    shape = [gpu_tier.shape[0], *gpu_tier.shape[2:]]
    if index["block_shape"] != shape or index["dtype"] != str(gpu_tier.dtype):
        raise ValueError(f"{root}: block shape {index['block_shape']} {index['dtype']} != {shape} {gpu_tier.dtype}")
    target, tier = (cpu_tier, "cpu") if kv.num_cpu_blocks > 0 else (gpu_tier, "gpu")
    record = gpu_tier[:, 0].numel() * gpu_tier.element_size()
    order = np.argsort(index["idle_seconds"], kind="stable")   # most recently used first
    loaded = 0
    raw = np.memmap(root / "kv.bin", dtype=np.uint8, mode="r") if index["keys"] else None
    for i in order:
        key = bytes.fromhex(index["keys"][i])
        block = kv.adopt_block(tier, key, index["positions"][i], now - index["idle_seconds"][i])
        if block is None:
            if kv.num_free(tier) == 0:
                break
            continue   # already cached (a live engine): keep what is there
        data = torch.from_numpy(np.array(raw[i * record:(i + 1) * record]))
        target[:, block].copy_(_from_bytes(data, target[:, block]))
        loaded += 1
    for cid, conv in index["conversations"].items():
        kv.record_conversation(cid, [bytes.fromhex(k) for k in conv["keys"]], conv["tokens"])
    return loaded


def _to_bytes(t: torch.Tensor) -> bytes:
    return t.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes()


def _from_bytes(raw: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return raw.view(like.dtype).view(like.shape).to(like.device)
