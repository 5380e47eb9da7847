"""GGUF files the loader must refuse in one line, and what identifies a GGUF's KV cache on disk.

The files are written here with the `gguf` package's writer: a llama.cpp-shaped header and a tensor or two.
(Loading a real GGUF, token for token against transformers, is tests/test_demo_model.py.)
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from pensieve.errors import CheckpointError  # noqa: E402
from pensieve.model.loader import load_model  # noqa: E402


def write_gguf(path: Path, arch: str = "llama", qtype: "gguf.GGMLQuantizationType | None" = None,
               fill: float = 0.0) -> Path:
    """A 1-layer model header of `arch` with a token embedding stored as `qtype` (raw bytes) or float32."""
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_context_length(64)
    writer.add_embedding_length(32)
    writer.add_block_count(1)
    writer.add_feed_forward_length(64)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(16)
    writer.add_tokenizer_model("gpt2")   # a byte-level BPE vocabulary: the 16 letters a..p
    writer.add_token_list([chr(ord("a") + i) for i in range(16)])
    writer.add_token_types([1] * 16)
    writer.add_token_scores([0.0] * 16)
    writer.add_token_merges([])
    writer.add_eos_token_id(0)
    if qtype is None:
        writer.add_tensor("token_embd.weight", np.full((16, 32), fill, dtype=np.float32))
    else:
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        raw = np.zeros((16, 32 // block * size), dtype=np.uint8)
        writer.add_tensor("token_embd.weight", raw, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text and isinstance(exc.value, CheckpointError)
    return text


def test_unsupported_quantization_type_is_one_line(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "q81.gguf", qtype=gguf.GGMLQuantizationType.Q8_1)
    with pytest.raises(CheckpointError) as exc:
        load_model(path, "float32", "cpu")
    assert _one_line(exc) == f"{path}: unsupported GGUF quantization type(s) Q8_1"


@pytest.mark.parametrize("arch,message", [
    ("gpt2", "unsupported architecture 'GPT2LMHeadModel'"),      # transformers reads it; we do not serve it
    ("rwkv6", "is not supported"),                               # transformers cannot read it either
])
def test_unsupported_architecture_is_one_line(tmp_path: Path, arch: str, message: str) -> None:
    path = write_gguf(tmp_path / f"{arch}.gguf", arch=arch)
    with pytest.raises(CheckpointError) as exc:
        load_model(path, "float32", "cpu")
    assert message in _one_line(exc)


def test_cli_reports_a_bad_gguf_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pensieve.cli import main

    path = write_gguf(tmp_path / "q81.gguf", qtype=gguf.GGMLQuantizationType.Q8_1)
    assert main(["chat", str(path), "--device", "cpu"]) == 2
    assert capsys.readouterr().err == f"pensieve chat: error: {path}: unsupported GGUF quantization type(s) Q8_1\n"
    bare = tmp_path / "bare.gguf"
    writer = gguf.GGUFWriter(str(bare), "llama")   # no tokenizer in its metadata
    writer.add_block_count(1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    assert main(["chat", str(bare), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"pensieve chat: error: ") and err.count("\n") == 1, err


def test_kv_cache_fingerprint_identifies_the_gguf(tmp_path: Path) -> None:
    from pensieve.cache.persist import model_fingerprint

    a = write_gguf(tmp_path / "a.gguf", fill=0.0)
    b = write_gguf(tmp_path / "b.gguf", fill=1.0)   # same header and size, other weights
    fp = model_fingerprint(a, torch.float32, 16)
    assert fp == model_fingerprint(a, torch.float32, 16)
    assert fp != model_fingerprint(b, torch.float32, 16) and fp != model_fingerprint(a, torch.bfloat16, 16)
