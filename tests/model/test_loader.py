"""Checkpoint loading: sharded safetensors, .bin fallback, dtypes, KV spec, rope scaling."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from pensieve.model.layers import RotaryEmbedding, rope_parameters
from pensieve.model.loader import KVSpec, load_model, max_context_len, model_kv_spec, resolve_dtype
from pensieve.model.random_checkpoint import make_config
from tests.model.conftest import build_variant
from tests.model.paged import PagedSeqs


def _logits(model, config, ids: list[int]) -> torch.Tensor:
    return PagedSeqs(model, config).step([(0, ids, None)])[0]


def _same_params(a: torch.nn.Module, b: torch.nn.Module) -> None:
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    assert pa.keys() == pb.keys()
    for name in pa:
        assert torch.equal(pa[name], pb[name]), name


def test_sharded_safetensors(tmp_path, model_pair):
    _, reference, _ = model_pair("qwen2")
    path = build_variant(tmp_path / "sharded", "qwen2", max_shard_bytes=30_000)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    model, _, _ = load_model(path, "float32", "cpu")
    _same_params(model, reference)  # same seed and config as the session's unsharded qwen2


def test_bin_fallback(tmp_path, tiny_checkpoint, model_pair):
    hf, reference, config = model_pair("opt")
    out = tmp_path / "bin"
    out.mkdir()
    shutil.copy(tiny_checkpoint("opt") / "config.json", out / "config.json")
    # facebook/opt-* .bin files hold OPTModel's names (no "model." prefix) and no lm_head.
    state = {k.removeprefix("model."): v for k, v in hf.state_dict().items() if not k.startswith("lm_head.")}
    torch.save(state, out / "pytorch_model.bin")
    model, _, _ = load_model(str(out), "auto", "cpu")
    _same_params(model, reference)


def test_missing_tensor_is_an_error(tmp_path, model_pair):
    hf, _, config = model_pair("llama")
    out = tmp_path / "partial"
    out.mkdir()
    config.save_pretrained(out)
    state = {k: v for k, v in hf.state_dict().items() if ".1.mlp.up_proj" not in k}
    torch.save(state, out / "pytorch_model.bin")
    with pytest.raises(ValueError, match="gate_up_proj"):
        load_model(out, "float32", "cpu")


def test_tied_embeddings(tiny_checkpoint, model_pair):
    from safetensors import safe_open

    _, ours, config = model_pair("llama-tied-mha-bias")
    with safe_open(str(tiny_checkpoint("llama-tied-mha-bias") / "model.safetensors"), "pt") as f:
        assert not any(k.startswith("lm_head") for k in f.keys())
    # tied: the logits are the embedding's (on a CPU through a copy laid out for the GEMM, layers.py)
    assert ours.lm_head is None or torch.equal(ours.lm_head.weight, ours.model.embed_tokens.weight)
    hidden = torch.randn(3, config.hidden_size)
    torch.testing.assert_close(ours.compute_logits(hidden), hidden @ ours.model.embed_tokens.weight.T)
    _, untied, _ = model_pair("llama")
    assert untied.lm_head is not None


def test_dtypes(tiny_checkpoint, model_pair):
    _, reference, config = model_pair("qwen3")
    path = tiny_checkpoint("qwen3")
    model, _, dtype = load_model(path, "bfloat16", "cpu")
    assert dtype == torch.bfloat16 and all(p.dtype == torch.bfloat16 for p in model.parameters())
    ids = list(range(5, 17))
    want = _logits(reference, config, ids)
    got = _logits(model, config, ids)
    assert got.dtype == torch.float32
    assert (got - want).abs().max() < 0.1 * want.abs().max()  # bf16 rounding, not a different model
    assert resolve_dtype("auto", config, torch.device("cpu")) == torch.float32
    config.dtype = torch.bfloat16
    assert resolve_dtype("auto", config, torch.device("cuda")) == torch.bfloat16
    config.dtype = "float16"
    assert resolve_dtype("auto", config, torch.device("cuda")) == torch.float16
    assert resolve_dtype(torch.float16, config, torch.device("cpu")) == torch.float16
    with pytest.raises(ValueError):
        resolve_dtype("int3", config, torch.device("cpu"))


def test_kv_spec_and_context():
    assert model_kv_spec(make_config("llama", "llama-2-13b-gqa10")) == KVSpec(40, 10, 128)
    assert model_kv_spec(make_config("opt", "opt-13b")) == KVSpec(40, 40, 128)
    assert model_kv_spec(make_config("qwen3", "qwen3-8b")) == KVSpec(36, 8, 128)
    assert max_context_len(make_config("llama", "llama-3.1-8b")) == 131072
    assert max_context_len(make_config("opt", "opt-13b")) == 2048
    # Mistral's sliding window caps the context (we attend over the full context).
    assert max_context_len(make_config("mistral", "tiny", sliding_window=256)) == 256
    assert max_context_len(make_config("qwen2", "tiny", sliding_window=256, use_sliding_window=False)) == 512


def test_llama3_rope_scaling_matches_hf():
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = make_config("llama", "llama-3.1-8b")
    theta, scaling = rope_parameters(config)
    assert theta == 500000.0 and scaling is not None and scaling["rope_type"] == "llama3"
    positions = torch.tensor([0, 1, 7, 100, 8191, 8192, 20000, 100000, 131071])
    ours = RotaryEmbedding(128, 131072, theta, scaling)
    cos, sin = LlamaRotaryEmbedding(config)(torch.zeros(1, dtype=torch.float32), positions[None])
    half = 64
    got_cos, got_sin = ours.cos_sin[positions].chunk(2, dim=-1)
    torch.testing.assert_close(got_cos, cos[0, :, :half], atol=1e-5, rtol=0)
    torch.testing.assert_close(got_sin, sin[0, :, :half], atol=1e-5, rtol=0)
    # The scaling is real: low frequencies are slowed down 8x relative to plain rope.
    plain = RotaryEmbedding(128, 16, theta, None)
    assert not torch.allclose(ours.cos_sin[:16], plain.cos_sin)


def test_linear_rope_scaling():
    theta, scaling = rope_parameters(make_config("llama", "tiny", rope_scaling={"rope_type": "linear", "factor": 4.0}))
    scaled, plain = RotaryEmbedding(16, 64, theta, scaling), RotaryEmbedding(16, 16, theta, None)
    # Linear scaling: position 4p of the scaled table is position p of the plain one.
    torch.testing.assert_close(scaled.cos_sin[0:64:4], plain.cos_sin, atol=1e-5, rtol=0)
    with pytest.raises(NotImplementedError):
        RotaryEmbedding(16, 64, theta, {"rope_type": "dynamic", "factor": 2.0})


def test_cpu_linears_use_the_row_major_transpose(tiny_checkpoint, model_pair):
    """On a CPU every linear's weight is the [out, in] view of an [in, out] row-major matrix (the faster
    GEMM at decode batch sizes); the values, and so the logits, are the checkpoint's (the tests above)."""
    from pensieve.model.layers import Linear

    _, ours, _ = model_pair("llama")
    linears = [m for m in ours.modules() if isinstance(m, Linear)]
    assert linears and all(m.weight.stride() == (1, m.weight.shape[0]) for m in linears)
