"""OPT: learned positions (offset 2), LayerNorm, ReLU MLP, MHA with biases.

Supports both layer-norm placements (`do_layer_norm_before`; OPT-350M is the
post-norm one) and the `word_embed_proj_dim` projections around the decoder.
forward returns the decoder output before `project_out`; compute_logits
applies it, so only the rows that are sampled pay for it.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from pensieve.kernels import SmallLinearWorkspace
from pensieve.model.attention import PagedAttention
from pensieve.model.layers import Embedding, LayerNorm, Linear, linear, load_named_weights
from pensieve.model.metadata import AttentionMetadata

# OPT's learned position table starts with two rows it never uses for real positions.
POSITION_OFFSET = 2

_STACKED = (
    ("qkv_proj", "q_proj", 0),
    ("qkv_proj", "k_proj", 1),
    ("qkv_proj", "v_proj", 2),
)


class OPTAttention(nn.Module):
    def __init__(self, config, layer_idx: int, dtype: torch.dtype) -> None:
        super().__init__()
        hidden, self.num_heads = config.hidden_size, config.num_attention_heads
        head_dim = hidden // self.num_heads
        bias = bool(getattr(config, "enable_bias", True))
        self.hidden = hidden
        self.qkv_proj = Linear(hidden, (hidden, hidden, hidden), bias, dtype)
        self.out_proj = Linear(hidden, hidden, bias, dtype)
        self.attn = PagedAttention(self.num_heads, self.num_heads, head_dim, head_dim**-0.5, layer_idx)

    def forward(self, x: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:  # [T, hidden]
        q, k, v = self.qkv_proj(x).split(self.hidden, dim=-1)
        return self.out_proj(self.attn(q, k, v, kv_cache, meta))  # strided views: the kernels take any row stride


class OPTDecoderLayer(nn.Module):
    def __init__(self, config, layer_idx: int, dtype: torch.dtype) -> None:
        super().__init__()
        act = getattr(config, "activation_function", "relu")
        if act != "relu":
            raise NotImplementedError(f"activation_function {act!r}")
        hidden = config.hidden_size
        bias = bool(getattr(config, "enable_bias", True))
        affine = bool(getattr(config, "layer_norm_elementwise_affine", True))
        self.pre_norm = bool(config.do_layer_norm_before)
        self.self_attn = OPTAttention(config, layer_idx, dtype)
        self.self_attn_layer_norm = LayerNorm(hidden, 1e-5, affine, dtype)
        self.fc1 = Linear(hidden, config.ffn_dim, bias, dtype)
        self.fc2 = Linear(config.ffn_dim, hidden, bias, dtype)
        self.final_layer_norm = LayerNorm(hidden, 1e-5, affine, dtype)

    def forward(self, x: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:  # [T, hidden]
        if self.pre_norm:
            x = x + self.self_attn(self.self_attn_layer_norm(x), kv_cache, meta)
            return x + self.fc2(torch.relu(self.fc1(self.final_layer_norm(x))))
        x = self.self_attn_layer_norm(x + self.self_attn(x, kv_cache, meta))
        return self.final_layer_norm(x + self.fc2(torch.relu(self.fc1(x))))


class OPTDecoder(nn.Module):
    def __init__(self, config, dtype: torch.dtype) -> None:
        super().__init__()
        hidden, proj_dim = config.hidden_size, getattr(config, "word_embed_proj_dim", None) or config.hidden_size
        self.embed_tokens = Embedding(config.vocab_size, proj_dim, dtype)
        self.embed_positions = Embedding(config.max_position_embeddings + POSITION_OFFSET, hidden, dtype)
        self.project_in = Linear(proj_dim, hidden, False, dtype) if proj_dim != hidden else None
        self.project_out = Linear(hidden, proj_dim, False, dtype) if proj_dim != hidden else None
        has_final_norm = config.do_layer_norm_before and not getattr(config, "_remove_final_layer_norm", False)
        affine = bool(getattr(config, "layer_norm_elementwise_affine", True))
        self.final_layer_norm = LayerNorm(hidden, 1e-5, affine, dtype) if has_final_norm else None
        self.layers = nn.ModuleList(OPTDecoderLayer(config, i, dtype) for i in range(config.num_hidden_layers))

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor], meta: AttentionMetadata
    ) -> torch.Tensor:  # [T, hidden]
        x = self.embed_tokens(input_ids)
        if self.project_in is not None:
            x = self.project_in(x)
        x = x + self.embed_positions(positions + POSITION_OFFSET)
        for layer, kv_cache in zip(self.layers, kv_caches):
            x = layer(x, kv_cache, meta)
        if self.final_layer_norm is not None:
            x = self.final_layer_norm(x)
        return x


class _OPTModel(nn.Module):
    """Only gives parameters HF's names (model.decoder.*)."""

    def __init__(self, config, dtype: torch.dtype) -> None:
        super().__init__()
        self.decoder = OPTDecoder(config, dtype)


class OPTForCausalLM(nn.Module):
    def __init__(self, config, dtype: torch.dtype) -> None:
        super().__init__()
        self.config = config
        self.model = _OPTModel(config, dtype)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", True))
        proj_dim = getattr(config, "word_embed_proj_dim", None) or config.hidden_size
        self.lm_head = None if self.tie_word_embeddings else Linear(proj_dim, config.vocab_size, False, dtype)
        self.logits_workspace = SmallLinearWorkspace()

    def forward(
        self,
        input_ids: torch.Tensor,        # [T] int64
        positions: torch.Tensor,        # [T] int64
        kv_caches: list[torch.Tensor],  # per layer [num_blocks, 2, block_size, H, D]
        meta: AttentionMetadata,
    ) -> torch.Tensor:                  # [T, hidden]
        return self.model.decoder(input_ids, positions, kv_caches, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:  # [N, hidden] -> [N, vocab] float32
        decoder = self.model.decoder
        if decoder.project_out is not None:
            hidden = decoder.project_out(hidden)
        weight = decoder.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return linear(hidden, weight, None, self.logits_workspace).float()

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        # facebook/opt-* checkpoints were saved from OPTModel: their names lack the "model." prefix.
        renamed = ((("model." + n) if n.startswith("decoder.") else n, t) for n, t in weights)
        skip = ["lm_head."] if self.tie_word_embeddings else []
        load_named_weights(self, renamed, _STACKED, skip)
