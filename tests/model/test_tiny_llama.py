"""The tiny random Llama of the unit tests: built once, atomically, and usable."""
from __future__ import annotations

import time

import torch

from pensieve.model.tiny_llama import TINY_LLAMA_VERSION, tiny_llama_path
from pensieve.model.loader import load_model
from tests.model.paged import PagedSeqs


def test_tiny_llama_path(tmp_path, monkeypatch):
    monkeypatch.setenv("PENSIEVE_CACHE_DIR", str(tmp_path))
    start = time.monotonic()
    path = tiny_llama_path()
    assert time.monotonic() - start < 10
    assert path == tmp_path / TINY_LLAMA_VERSION
    assert [p.name for p in tmp_path.iterdir()] == [TINY_LLAMA_VERSION]  # no temp dir left behind
    stamp = (path / "config.json").stat().st_mtime_ns
    assert tiny_llama_path() == path and (path / "config.json").stat().st_mtime_ns == stamp  # cached

    model, config, dtype = load_model(path, "auto", "cpu")
    assert dtype == torch.float32 and config.num_hidden_layers == 4 and config.hidden_size == 256
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    ids = tok.apply_chat_template([{"role": "user", "content": "Hello"}], add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    paged = PagedSeqs(model, config)
    [logits] = paged.step([(0, list(ids), None)])
    out = [int(logits[-1].argmax())]
    for _ in range(4):
        out.append(int(paged.step([(0, [out[-1]], None)])[0][-1].argmax()))
    assert all(0 <= t < len(tok) for t in out)
    assert isinstance(tok.decode(out), str)
