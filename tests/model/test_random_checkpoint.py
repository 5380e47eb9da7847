"""Random checkpoints (both writers) and the built-in tokenizer."""
from __future__ import annotations

import json

import pytest
import torch

from pensieve.model.loader import load_model, model_kv_spec
from pensieve.model.random_checkpoint import CHAT_TEMPLATE, PRESETS, build_tokenizer, make_config, make_random_checkpoint
from tests.model.paged import PagedSeqs


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    build_tokenizer(out)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(out))  # what the engine will load


@pytest.mark.parametrize("text", [
    "Hello, world!",
    "  leading and trailing spaces\t\n\n",
    "unicode: émigré, 中文, ελληνικά, emoji 🚀🧠",
    "code: def f(x):\n    return {'a': [1, 2.5e-3]}",
    "<|im_start|>user\nhi<|im_end|>\n",
    "",
])
def test_tokenizer_round_trip(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text


def test_tokenizer_vocab_and_specials(tokenizer):
    assert 1000 <= len(tokenizer) <= 2000
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.bos_token == "<s>" and tokenizer.pad_token == "<pad>"
    assert len({tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}) == 3
    # Chat markers are single tokens, never split.
    ids = tokenizer.encode("<|im_start|>assistant", add_special_tokens=False)
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")
    # Common English compresses well below one token per character.
    text = "The server keeps the cache of each conversation in memory."
    assert len(tokenizer.encode(text, add_special_tokens=False)) < len(text) / 2.5
    assert build_tokenizer().get_vocab() == tokenizer.get_vocab()  # deterministic


def test_chat_template(tokenizer):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": [{"type": "text", "text": "What is "}, {"type": "text", "text": "a cache?"}]},
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nWhat is a cache?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    no_prompt = tokenizer.apply_chat_template(messages[:2], tokenize=False)
    assert no_prompt.endswith("Hi<|im_end|>\n")
    assert tokenizer.chat_template == CHAT_TEMPLATE
    # A turn's template output is a prefix of the next turn's: appended turns reuse the cache.
    assert text.startswith(tokenizer.apply_chat_template(messages[:3], tokenize=False))


def test_tiny_checkpoint_ids_are_consistent(tmp_path, tokenizer):
    path = make_random_checkpoint(tmp_path / "ck", "qwen3")
    config = json.loads((path / "config.json").read_text())
    assert config["vocab_size"] == len(tokenizer)
    assert config["eos_token_id"] == tokenizer.eos_token_id and config["bos_token_id"] == tokenizer.bos_token_id
    assert config["architectures"] == ["Qwen3ForCausalLM"]
    assert (path / "tokenizer.json").exists()


def test_real_shape_vocab_decodes_every_id(tmp_path, tokenizer):
    """A model with more ids than the BPE (every real shape) gets visible filler tokens for the rest, so a
    client reading the streamed text sees every sampled token, and resending that text gives the same ids;
    text without filler tokenizes as without them."""
    from transformers import AutoTokenizer

    path = make_random_checkpoint(tmp_path / "wide", "llama", vocab_size=3000)
    wide = AutoTokenizer.from_pretrained(str(path))
    assert len(wide) == json.loads((path / "config.json").read_text())["vocab_size"] == 3000
    assert all(wide.decode([i]) for i in range(len(tokenizer), 3000))
    text = "Hello! <t 1500> the cache keeps each turn, 3.14 {\"k\": [1]}"
    assert wide.encode(text) == tokenizer.encode(text)
    ids = [1500, 2999, len(tokenizer)]
    assert wide.encode(wide.decode(ids), add_special_tokens=False) == ids


def test_direct_writer_shards_and_loads(tmp_path):
    path = make_random_checkpoint(
        tmp_path / "direct", "llama", direct=True, max_shard_bytes=40_000, seed=7, tokenizer=False,
        num_key_value_heads=1,
    )
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    assert not (path / "tokenizer.json").exists()
    model, config, _ = load_model(path, "auto", "cpu")
    assert model_kv_spec(config).num_kv_heads == 1
    layer = model.model.layers[0]
    assert torch.equal(layer.input_layernorm.weight, torch.ones(config.hidden_size))  # norms start at one
    std = layer.mlp.gate_up_proj.weight.std().item()
    assert 0.015 < std < 0.025  # N(0, initializer_range)
    [logits] = PagedSeqs(model, config).step([(0, [5, 6, 7], None)])
    assert torch.isfinite(logits).all()
    # Same seed, same tensors.
    again, _, _ = load_model(
        make_random_checkpoint(tmp_path / "again", "llama", direct=True, seed=7, tokenizer=False, num_key_value_heads=1),
        "auto", "cpu")
    assert torch.equal(again.model.embed_tokens.weight, model.model.embed_tokens.weight)


def test_presets_have_real_shapes():
    gqa = make_config("llama", "llama-2-13b-gqa10")
    assert (gqa.num_hidden_layers, gqa.hidden_size, gqa.num_attention_heads, gqa.num_key_value_heads) == (40, 5120, 40, 10)
    assert make_config("llama", "llama-2-13b").num_key_value_heads == 40
    assert make_config("opt", "opt-13b").ffn_dim == 20480
    with pytest.raises(ValueError):
        make_config("opt", "llama-2-13b")
    with pytest.raises(ValueError):
        make_config("gpt2", "tiny")
    assert {"llama-2-13b", "llama-2-13b-gqa10", "llama-3.1-8b", "opt-13b", "qwen3-8b"} <= PRESETS.keys()
