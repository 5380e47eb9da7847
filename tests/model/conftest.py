"""Tiny random checkpoints of every supported architecture, built once per session."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from pensieve.model.loader import load_model
from pensieve.model.random_checkpoint import make_random_checkpoint

_LLAMA3_ROPE = {
    "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
    # Small enough that the tiny model's frequencies fall in all three bands.
    "original_max_position_embeddings": 64,
}

# variant -> (arch, config overrides). initializer_range 0.1 (not 0.02) gives
# peaked attention, so a wrong mask or rotary shows in the logits.
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("llama", {}),
    "llama3-rope": ("llama", dict(rope_theta=500000.0, rope_scaling=_LLAMA3_ROPE)),
    "llama-tied-mha-bias": ("llama", dict(
        tie_word_embeddings=True, num_key_value_heads=4, attention_bias=True, mlp_bias=True)),
    "mistral": ("mistral", dict(num_key_value_heads=1)),
    "qwen2": ("qwen2", {}),
    "qwen3": ("qwen3", {}),
    "opt": ("opt", {}),
    "opt-postnorm-proj": ("opt", dict(do_layer_norm_before=False, word_embed_proj_dim=32)),
}


def build_variant(path: Path, variant: str, **kwargs: Any) -> Path:
    arch, overrides = VARIANTS[variant]
    init = {"init_std": 0.1} if arch == "opt" else {"initializer_range": 0.1}
    return make_random_checkpoint(path, arch, seed=list(VARIANTS).index(variant), perturb=0.1, **init, **overrides, **kwargs)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Callable[[str], Path]:
    """variant -> checkpoint directory (built on first request)."""
    built: dict[str, Path] = {}

    def get(variant: str) -> Path:
        if variant not in built:
            built[variant] = build_variant(tmp_path_factory.mktemp(variant), variant)
        return built[variant]

    return get


@pytest.fixture(scope="session")
def model_pair(tiny_checkpoint) -> Callable[[str], tuple[torch.nn.Module, torch.nn.Module, Any]]:
    """variant -> (HF transformers model, our model, config), both float32 on the CPU."""
    pairs: dict[str, tuple[torch.nn.Module, torch.nn.Module, Any]] = {}

    def get(variant: str):
        if variant not in pairs:
            from transformers import AutoModelForCausalLM

            path = tiny_checkpoint(variant)
            hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
            ours, config, dtype = load_model(str(path), "auto", "cpu")
            assert dtype == torch.float32
            pairs[variant] = (hf, ours, config)
        return pairs[variant]

    return get
