"""A tiny random-weight Llama (4 layers, 256 wide) with a real tokenizer, built once and cached.

Its answers are noise: it exists for fast unit tests and CPU benchmarks of the engine itself. The model
that answers questions is the demo model (pensieve/demo.py).
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

TINY_LLAMA_VERSION = "tiny-llama-v1"
TINY_LLAMA_CONFIG = dict(
    num_hidden_layers=4, hidden_size=256, intermediate_size=512, num_attention_heads=8,
    num_key_value_heads=4, head_dim=32, max_position_embeddings=4096, rope_theta=10000.0,
)


def tiny_llama_path() -> Path:
    """Directory of the tiny random checkpoint; built on first use under $PENSIEVE_CACHE_DIR (or ~/.cache/pensieve)."""
    root = Path(os.environ.get("PENSIEVE_CACHE_DIR") or Path.home() / ".cache" / "pensieve")
    target = root / TINY_LLAMA_VERSION
    if (target / "config.json").exists():
        return target
    from pensieve.model.random_checkpoint import make_random_checkpoint

    root.mkdir(parents=True, exist_ok=True)
    # Build in a temp dir beside the target and rename: a concurrent or killed
    # build never leaves a half-written checkpoint at the target.
    tmp = Path(tempfile.mkdtemp(prefix=f".{TINY_LLAMA_VERSION}-", dir=root))
    try:
        make_random_checkpoint(tmp, "llama", dtype=torch.float32, seed=0, direct=False, **TINY_LLAMA_CONFIG)
        try:
            tmp.rename(target)
        except OSError:
            if not (target / "config.json").exists():  # not a lost race: a real failure
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target
