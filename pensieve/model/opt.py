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

from pensieve.distributed.group import SINGLE, HeadShard, ParallelGroup
from pensieve.kernels import SmallLinearWorkspace
from pensieve.kernels.metadata import AttentionMetadata
from pensieve.model.attention import PagedAttention
from pensieve.model.layers import (Embedding, LayerNorm, Linear, VocabParallelEmbedding, load_named_weights,
                                   vocab_logits)

# OPT's learned position table starts with two rows it never uses for real positions.
POSITION_OFFSET = 2

_STACKED = (
    ("qkv_proj", "q_proj", 0),
    ("qkv_proj", "k_proj", 1),
    ("qkv_proj", "v_proj", 2),
)


class OPTAttention(nn.Module):
    """MHA; under tensor parallelism a rank holds num_heads / size heads (qkv column-, out row-parallel)."""

    def __init__(self, config, layer_idx: int, dtype: torch.dtype, tp: ParallelGroup) -> None:
        super().__init__()
        hidden = config.hidden_size
        head_dim = hidden // config.num_attention_heads
        heads = HeadShard.of(config.num_attention_heads, config.num_attention_heads, tp)
        self.num_heads = heads.num_q
        bias = bool(getattr(config, "enable_bias", True))
        self.local = local = self.num_heads * head_dim
        start = heads.q_start * head_dim
        self.qkv_proj = Linear(hidden, (local, local, local), bias, dtype,
                               output_starts=(start, start, start) if tp.size > 1 else None)
        self.out_proj = Linear.row(hidden, hidden, bias, dtype, tp)
        self.attn = PagedAttention(self.num_heads, self.num_heads, head_dim, head_dim**-0.5, layer_idx)

    def forward(self, x: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:  # [T, hidden]
        q, k, v = self.qkv_proj(x).split(self.local, dim=-1)
        return self.out_proj(self.attn(q, k, v, kv_cache, meta))  # strided views: the kernels take any row stride


class OPTDecoderLayer(nn.Module):
    def __init__(self, config, layer_idx: int, dtype: torch.dtype, tp: ParallelGroup) -> None:
        super().__init__()
        act = getattr(config, "activation_function", "relu")
        if act != "relu":
            raise NotImplementedError(f"activation_function {act!r}")
        hidden = config.hidden_size
        bias = bool(getattr(config, "enable_bias", True))
        affine = bool(getattr(config, "layer_norm_elementwise_affine", True))
        self.pre_norm = bool(config.do_layer_norm_before)
        self.self_attn = OPTAttention(config, layer_idx, dtype, tp)
        self.self_attn_layer_norm = LayerNorm(hidden, 1e-5, affine, dtype)
        self.fc1 = Linear.column(hidden, config.ffn_dim, bias, dtype, tp)
        self.fc2 = Linear.row(config.ffn_dim, hidden, bias, dtype, tp)
        self.final_layer_norm = LayerNorm(hidden, 1e-5, affine, dtype)

    def forward(self, x: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:  # [T, hidden]
        if self.pre_norm:
            x = x + self.self_attn(self.self_attn_layer_norm(x), kv_cache, meta)
            return x + self.fc2(torch.relu(self.fc1(self.final_layer_norm(x))))
        x = self.self_attn_layer_norm(x + self.self_attn(x, kv_cache, meta))
        return self.final_layer_norm(x + self.fc2(torch.relu(self.fc1(x))))


class OPTDecoder(nn.Module):
    def __init__(self, config, dtype: torch.dtype, tp: ParallelGroup) -> None:
        super().__init__()
        hidden, proj_dim = config.hidden_size, getattr(config, "word_embed_proj_dim", None) or config.hidden_size
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, proj_dim, dtype, tp)
        self.embed_positions = Embedding(config.max_position_embeddings + POSITION_OFFSET, hidden, dtype)
        self.project_in = Linear(proj_dim, hidden, False, dtype) if proj_dim != hidden else None
        self.project_out = Linear(hidden, proj_dim, False, dtype) if proj_dim != hidden else None
        has_final_norm = config.do_layer_norm_before and not getattr(config, "_remove_final_layer_norm", False)
        affine = bool(getattr(config, "layer_norm_elementwise_affine", True))
        self.final_layer_norm = LayerNorm(hidden, 1e-5, affine, dtype) if has_final_norm else None
        self.layers = nn.ModuleList(OPTDecoderLayer(config, i, dtype, tp) for i in range(config.num_hidden_layers))

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

    def __init__(self, config, dtype: torch.dtype, tp: ParallelGroup) -> None:
        super().__init__()
        self.decoder = OPTDecoder(config, dtype, tp)


class OPTForCausalLM(nn.Module):
    def __init__(self, config, dtype: torch.dtype, tp: ParallelGroup = SINGLE) -> None:
        super().__init__()
        self.config = config
        self.tp = tp
        self.model = _OPTModel(config, dtype, tp)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", True))
        proj_dim = getattr(config, "word_embed_proj_dim", None) or config.hidden_size
        self.lm_head = (None if self.tie_word_embeddings
                        else VocabParallelEmbedding(config.vocab_size, proj_dim, dtype, tp))
        self.logits_workspace = SmallLinearWorkspace()

    def forward(
        self,
        input_ids: torch.Tensor,        # [T] int64
        positions: torch.Tensor,        # [T] int64
        kv_caches: list[torch.Tensor],  # per layer [num_blocks, 2, block_size, H, D]
        meta: AttentionMetadata,
    ) -> torch.Tensor:                  # [T, hidden]
        return self.model.decoder(input_ids, positions, kv_caches, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:  # [N, hidden] -> [N, vocab] float32
        """Logits on rank 0 (gathered from the vocab shards); None on the other ranks."""
        decoder = self.model.decoder
        if decoder.project_out is not None:
            hidden = decoder.project_out(hidden)
        weight = (decoder.embed_tokens if self.lm_head is None else self.lm_head).weight
        return vocab_logits(hidden, weight, self.config.vocab_size, self.tp, self.logits_workspace)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        # facebook/opt-* checkpoints were saved from OPTModel: their names lack the "model." prefix.
        renamed = ((("model." + n) if n.startswith("decoder.") else n, t) for n, t in weights)
        skip = ["lm_head."] if self.tie_word_embeddings else []
        load_named_weights(self, renamed, _STACKED, skip)
